"""HTTP routes for /api/v1/clusters/{id}/restores: restore a cluster's etcd from a backup."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, status

from services.api.auth.dependencies import AdminDep, ViewerDep
from services.api.kit.errors import errors
from services.api.kit.paging import CursorQuery, LimitQuery, Page, link_header
from services.api.kit.responses import ModelResponse
from services.api.kit.unit_of_work import SessionDep
from services.api.restores import service
from services.api.restores.schemas import RestoreCreate, RestoreRead

router = APIRouter(prefix="/clusters", tags=["restores"])

ClusterId = Annotated[str, Path(description="The cluster's id, or its name.", max_length=64)]
RestoreId = Annotated[str, Path(description="The restore's id.", max_length=64)]
ERRORS = errors(not_found="No such cluster (by id or name), or no such restore.")


@router.post(
    "/{cluster_id}/restores",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=RestoreRead,
    operation_id="createClusterRestore",
    summary="Restore a cluster's etcd from a backup",
    responses=errors(
        not_found="No such cluster (by id or name).",
        conflict="A restore of the cluster is under way, or it is being deleted.",
    ),
)
async def create_restore(
    cluster_id: ClusterId,
    body: RestoreCreate,
    session: SessionDep,
    admin: AdminDep,
) -> ModelResponse:
    """Start restoring the cluster's etcd from `backupId`, a Completed etcd backup of it.

    The backup service downloads and verifies the snapshot (stored and plaintext sha256,
    decryption, etcd's own hash) and refuses one older than the cluster's current revision
    unless `force`; the provisioner then scales the control plane and etcd to zero, restores
    every member from the snapshot and scales them back. Answers 202 with the restore in phase
    `Pending`; follow it at its `Location` (phases up to `Succeeded` or `Failed` with a
    `reason`). The cluster's phase is `Restoring` meanwhile.
    """
    restore = await service.request_restore(session, cluster_id, body)
    return ModelResponse(
        restore,
        status.HTTP_202_ACCEPTED,
        headers={"Location": f"/api/v1/clusters/{restore.cluster_id}/restores/{restore.id}"},
    )


@router.get(
    "/{cluster_id}/restores",
    response_model=Page[RestoreRead],
    operation_id="listClusterRestores",
    summary="List a cluster's restores",
    responses=ERRORS,
)
async def list_restores(
    cluster_id: ClusterId,
    request: Request,
    session: SessionDep,
    principal: ViewerDep,
    limit: LimitQuery = 100,
    cursor: CursorQuery = None,
) -> ModelResponse:
    """The cluster's restores, oldest first, a page at a time; `next` (and the Link header)
    continue."""
    page = await service.list_restores(session, cluster_id, limit=limit, cursor=cursor)
    return ModelResponse(page, headers=link_header(request, page.next))


@router.get(
    "/{cluster_id}/restores/{restore_id}",
    response_model=RestoreRead,
    operation_id="getClusterRestore",
    summary="Get a cluster restore",
    responses=ERRORS,
)
async def get_restore(
    cluster_id: ClusterId, restore_id: RestoreId, session: SessionDep, principal: ViewerDep
) -> ModelResponse:
    """One restore: its phase, the reason if it failed, and every phase it went through."""
    return ModelResponse(await service.get(session, cluster_id, restore_id))
