"""HTTP routes for /api/v1/clusters: parse, call the service, map the result."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Request, status

from services.api.auth.dependencies import OperatorDep, ViewerDep
from services.api.clusters import service
from services.api.clusters.schemas import ClusterCreate, ClusterPatch, ClusterRead
from services.api.db import SessionDep
from services.api.pagination import CursorQuery, LimitQuery, Page
from services.api.problems import Problem
from services.api.responses import ModelResponse

router = APIRouter(prefix="/clusters", tags=["clusters"])

ClusterId = Annotated[str, Path(description="The cluster's id.", max_length=64)]
ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "No such cluster."},
    422: {"model": Problem, "description": "Invalid input; `errors` names each field."},
}


def _notify(request: Request) -> service.Notify:
    relay = request.app.state.relay
    return relay.notify  # type: ignore[no-any-return]


NotifyDep = Annotated[service.Notify, Depends(_notify)]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ClusterRead,
    operation_id="createCluster",
    summary="Create a cluster",
    responses={409: {"model": Problem, "description": "The name is taken."}, **ERRORS},
)
async def create_cluster(
    body: ClusterCreate, session: SessionDep, notify: NotifyDep, principal: OperatorDep
) -> ModelResponse:
    """Create a hosted control plane. Only `name` is required."""
    created = await service.create(session, body, notify)
    return ModelResponse(
        created, status.HTTP_201_CREATED, headers={"Location": f"/api/v1/clusters/{created.id}"}
    )


@router.get(
    "", response_model=Page[ClusterRead], operation_id="listClusters", summary="List clusters"
)
async def list_clusters(
    session: SessionDep,
    principal: ViewerDep,
    limit: LimitQuery = 100,
    cursor: CursorQuery = None,
) -> ModelResponse:
    """Clusters in creation order, a page at a time."""
    return ModelResponse(await service.list_clusters(session, limit=limit, cursor=cursor))


@router.get(
    "/{cluster_id}",
    response_model=ClusterRead,
    operation_id="getCluster",
    summary="Get a cluster",
    responses=ERRORS,
)
async def get_cluster(
    cluster_id: ClusterId, session: SessionDep, principal: ViewerDep
) -> ModelResponse:
    """One cluster with its observed status."""
    return ModelResponse(await service.get(session, cluster_id))


@router.patch(
    "/{cluster_id}",
    response_model=ClusterRead,
    operation_id="updateCluster",
    summary="Change a cluster (JSON merge patch)",
    responses={409: {"model": Problem, "description": "The cluster is being deleted."}, **ERRORS},
)
async def patch_cluster(
    cluster_id: ClusterId,
    body: Annotated[ClusterPatch, Body(media_type="application/merge-patch+json")],
    session: SessionDep,
    notify: NotifyDep,
    principal: OperatorDep,
) -> ModelResponse:
    """Merge `labels` and `spec` into the cluster; a spec change bumps `generation`."""
    return ModelResponse(await service.patch(session, cluster_id, body, notify))


@router.delete(
    "/{cluster_id}",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ClusterRead,
    operation_id="deleteCluster",
    summary="Delete a cluster",
    responses=ERRORS,
)
async def delete_cluster(
    cluster_id: ClusterId, session: SessionDep, notify: NotifyDep
) -> ClusterRead:
    """Mark the cluster `Deleting`; it disappears once the provisioner has removed it."""
    return await service.delete(session, cluster_id, notify)
