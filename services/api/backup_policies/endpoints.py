"""HTTP routes for /api/v1/backup-policies: read for viewers, write for admins."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path, Request, Response, status

from services.api.auth.dependencies import AdminDep, ViewerDep
from services.api.backup_policies import service
from services.api.backup_policies.schemas import (
    BackupPolicyCreate,
    BackupPolicyPatch,
    BackupPolicyRead,
)
from services.api.kit.errors import errors
from services.api.kit.etag import IfMatch
from services.api.kit.paging import CursorQuery, LimitQuery, Page, link_header
from services.api.kit.responses import ModelResponse, resource_response
from services.api.kit.unit_of_work import SessionDep

router = APIRouter(prefix="/backup-policies", tags=["backups"])

PolicyId = Annotated[str, Path(description="The backup policy's id, or its name.", max_length=64)]
NOT_FOUND = "No backup policy has this id, nor this name."
INVALID = (
    "Invalid input; `errors` names each field (e.g. `spec.schedule`, `spec.locationId`, "
    "`spec.targets.clusterIds.0`)."
)
ERRORS = errors(not_found=NOT_FOUND, invalid=INVALID)
WRITE_ERRORS = errors(not_found=NOT_FOUND, invalid=INVALID, precondition=True)


def _policy_response(policy: BackupPolicyRead, status_code: int = 200) -> ModelResponse:
    created = status_code == status.HTTP_201_CREATED
    location = f"/api/v1/backup-policies/{policy.id}" if created else None
    return resource_response(
        policy, status_code, location=location, version=policy.resource_version
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=BackupPolicyRead,
    operation_id="createBackupPolicy",
    summary="Create a backup policy",
    responses=errors(conflict="The name is taken.", invalid=INVALID),
)
async def create_backup_policy(
    body: Annotated[
        BackupPolicyCreate,
        Body(
            openapi_examples={
                "nightly": {
                    "summary": "Every cluster nightly, encrypted, 30 days",
                    "value": {
                        "name": "nightly",
                        "spec": {
                            "schedule": "0 2 * * *",
                            "targets": {"allClusters": True},
                            "locationId": "<backup location id>",
                            "retention": {"keepDays": 30},
                            "encrypted": True,
                        },
                    },
                }
            }
        ),
    ],
    session: SessionDep,
    admin: AdminDep,
) -> ModelResponse:
    """Back up the targets on the cron schedule (UTC) to the location, keeping what retention
    says; the backup service schedules from it at once. An event reports a target that has no
    successful backup within the RPO (`rpoMinutes`, default twice the longest gap between two
    firings), and restore drills run on `drillSchedule`."""
    return _policy_response(await service.create(session, body), status.HTTP_201_CREATED)


@router.get(
    "",
    response_model=Page[BackupPolicyRead],
    operation_id="listBackupPolicies",
    summary="List backup policies",
    responses=errors(),
)
async def list_backup_policies(
    request: Request,
    session: SessionDep,
    viewer: ViewerDep,
    limit: LimitQuery = 100,
    cursor: CursorQuery = None,
) -> ModelResponse:
    """Backup policies in creation order, a page at a time; `next` (and the Link header)
    continue."""
    page = await service.list_policies(session, limit=limit, cursor=cursor)
    return ModelResponse(page, headers=link_header(request, page.next))


@router.get(
    "/{policy_id}",
    response_model=BackupPolicyRead,
    operation_id="getBackupPolicy",
    summary="Get a backup policy",
    responses=ERRORS,
)
async def get_backup_policy(
    policy_id: PolicyId, session: SessionDep, viewer: ViewerDep
) -> ModelResponse:
    """One backup policy; the ETag header is its `resourceVersion`."""
    return _policy_response(await service.get(session, policy_id))


@router.patch(
    "/{policy_id}",
    response_model=BackupPolicyRead,
    operation_id="updateBackupPolicy",
    summary="Change a backup policy (JSON merge patch)",
    responses=WRITE_ERRORS,
)
async def patch_backup_policy(
    policy_id: PolicyId,
    body: Annotated[
        BackupPolicyPatch,
        Body(
            media_type="application/merge-patch+json",
            openapi_examples={
                "schedule": {
                    "summary": "Every six hours",
                    "value": {"spec": {"schedule": "0 */6 * * *"}},
                },
                "noDrills": {"summary": "Stop drills", "value": {"spec": {"drillSchedule": None}}},
            },
        ),
    ],
    session: SessionDep,
    admin: AdminDep,
    if_match: IfMatch = None,
) -> ModelResponse:
    """Merge `labels` and `spec` into the policy; a spec change bumps `generation` and reaches
    the backup service's schedules."""
    return _policy_response(await service.patch(session, policy_id, body, if_match))


@router.delete(
    "/{policy_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="deleteBackupPolicy",
    summary="Delete a backup policy",
    responses=WRITE_ERRORS,
)
async def delete_backup_policy(
    policy_id: PolicyId,
    session: SessionDep,
    admin: AdminDep,
    if_match: IfMatch = None,
) -> Response:
    """Stop scheduling the policy's backups; backups already stored stay where they are."""
    await service.delete(session, policy_id, if_match)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
