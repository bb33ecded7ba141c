"""HTTP routes for /api/v1/backups: back something up now (operator), list and read backups."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response, status

from services.api.auth.dependencies import OperatorDep, ViewerDep
from services.api.backups import service
from services.api.backups.schemas import BackupAccepted, BackupRead, BackupRequest, BackupState
from services.api.kit.errors import errors
from services.api.kit.paging import CursorQuery, LimitQuery, Page, link_header
from services.api.kit.responses import ModelResponse
from services.api.kit.unit_of_work import SessionDep

router = APIRouter(prefix="/backups", tags=["backups"])

ERRORS = errors()


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=BackupAccepted,
    operation_id="createBackup",
    summary="Back up the Foundry DB or a cluster now",
    responses=errors(conflict="The cluster is being deleted."),
)
async def create_backup(
    body: BackupRequest, session: SessionDep, operator: OperatorDep
) -> Response:
    """Stage a RunBackup intent; the backup service runs it and reports backup events.

    `policyId` runs it under a backup policy (its location, encryption and retention);
    `locationId` writes it to a backup location; neither uses the default. The backup then
    appears in `GET /api/v1/backups`, `Running` until it is `Completed` or `Failed`.
    """
    accepted = await service.request_backup(session, body)
    return ModelResponse(accepted, status.HTTP_202_ACCEPTED)


@router.get(
    "",
    response_model=Page[BackupRead],
    operation_id="listBackups",
    summary="List backups",
    responses=ERRORS,
)
async def list_backups(
    request: Request,
    session: SessionDep,
    principal: ViewerDep,
    limit: LimitQuery = 100,
    cursor: CursorQuery = None,
    target: Annotated[
        str | None,
        Query(max_length=128, description="Only this target: `foundry` or `cluster-<name>`."),
    ] = None,
    cluster_id: Annotated[
        str | None, Query(alias="clusterId", max_length=64, description="Only this cluster's.")
    ] = None,
    policy_id: Annotated[
        str | None,
        Query(alias="policyId", max_length=64, description="Only those taken under this policy."),
    ] = None,
    location_id: Annotated[
        str | None,
        Query(alias="locationId", max_length=64, description="Only those in this location."),
    ] = None,
    state: Annotated[BackupState | None, Query(description="Only backups in this state.")] = None,
) -> ModelResponse:
    """Backups as the backup service reported them, oldest first, a page at a time; `next`
    (and the Link header) continue. Pruned backups stay listed with state `Pruned`."""
    page = await service.list_backups(
        session,
        limit=limit,
        cursor=cursor,
        target=target,
        cluster_id=cluster_id,
        policy_id=policy_id,
        location_id=location_id,
        state=state,
    )
    return ModelResponse(page, headers=link_header(request, page.next))


@router.get(
    "/{backup_id}",
    response_model=BackupRead,
    operation_id="getBackup",
    summary="Get a backup",
    responses=errors(not_found="No backup has this id."),
)
async def get_backup(
    backup_id: Annotated[str, Path(max_length=64, description="The backup's id.")],
    session: SessionDep,
    principal: ViewerDep,
) -> ModelResponse:
    """One backup with its figures and its newest restore drill (`lastDrill`)."""
    return ModelResponse(await service.get(session, backup_id))
