"""HTTP routes for /api/v1/clusters: parse, call the service, map the result."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Body, Path, Query, Request, status

from libs.common.contract.kubeconfig import (
    DEFAULT_TTL_SECONDS,
    MAX_TTL_SECONDS,
    KubeconfigIssued,
)
from services.api.auth.dependencies import OperatorDep, ViewerDep
from services.api.clusters import kubeconfig, service
from services.api.clusters.schemas import ClusterCreate, ClusterPatch, ClusterRead
from services.api.kit.errors import errors
from services.api.kit.etag import IfMatch
from services.api.kit.paging import CursorQuery, LimitQuery, Page, link_header
from services.api.kit.responses import ModelResponse, resource_response
from services.api.kit.unit_of_work import SessionDep

router = APIRouter(prefix="/clusters", tags=["clusters"])

ClusterRef = Annotated[
    str,
    Path(
        description=(
            "The cluster's id, or its name: a name is accepted wherever an id is (an id wins "
            "should a name look like another cluster's id)."
        ),
        max_length=64,
    ),
]
NOT_FOUND = "No cluster has this id, nor this name."
ERRORS = errors(not_found=NOT_FOUND)
WRITE_ERRORS = errors(
    not_found=NOT_FOUND, conflict="The cluster is being deleted.", precondition=True
)


def _cluster_response(cluster: ClusterRead, status_code: int = 200) -> ModelResponse:
    location = f"/api/v1/clusters/{cluster.id}" if status_code == status.HTTP_201_CREATED else None
    return resource_response(
        cluster, status_code, location=location, version=cluster.resource_version
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ClusterRead,
    operation_id="createCluster",
    summary="Create a cluster",
    responses=errors(conflict="The name is taken."),
)
async def create_cluster(
    body: Annotated[
        ClusterCreate,
        Body(
            openapi_examples={
                "minimal": {"summary": "Only a name", "value": {"name": "demo"}},
                "production": {
                    "summary": "Three control-plane replicas on NodePort",
                    "value": {
                        "name": "prod-eu-1",
                        "labels": {"team": "payments"},
                        "spec": {
                            "controlPlane": {"replicas": 3},
                            "network": {"serviceType": "NodePort"},
                        },
                    },
                },
            }
        ),
    ],
    session: SessionDep,
    principal: OperatorDep,
) -> ModelResponse:
    """Create a hosted control plane. Only `name` is required; every spec field has a default.

    The provisioner is asked to build it; watch `status.phase` and `status.conditions`.
    Send an `Idempotency-Key` header to make retries safe.
    """
    return _cluster_response(await service.create(session, body), status.HTTP_201_CREATED)


@router.get(
    "",
    response_model=Page[ClusterRead],
    operation_id="listClusters",
    summary="List clusters",
    responses=errors(),
)
async def list_clusters(
    request: Request,
    session: SessionDep,
    principal: ViewerDep,
    limit: LimitQuery = 100,
    cursor: CursorQuery = None,
    label_selector: Annotated[
        str | None,
        Query(
            alias="labelSelector",
            max_length=1024,
            description="Kubernetes label selector, e.g. `team=payments,env!=dev,tier in (a,b)`.",
        ),
    ] = None,
    phase: Annotated[
        Literal["Pending", "Provisioning", "Ready", "Upgrading", "Degraded", "Deleting", "Failed"]
        | None,
        Query(description="Only clusters in this phase."),
    ] = None,
) -> ModelResponse:
    """Clusters in creation order, a page at a time; `next` (and the Link header) continue."""
    page = await service.list_clusters(
        session, limit=limit, cursor=cursor, selector=label_selector, phase=phase
    )
    return ModelResponse(page, headers=link_header(request, page.next))


@router.get(
    "/{cluster_id}",
    response_model=ClusterRead,
    operation_id="getCluster",
    summary="Get a cluster",
    responses=ERRORS,
)
async def get_cluster(
    cluster_id: ClusterRef, session: SessionDep, principal: ViewerDep
) -> ModelResponse:
    """One cluster, by id or name, with its observed status; the ETag header is its
    `resourceVersion`."""
    return _cluster_response(await service.get(session, cluster_id))


@router.patch(
    "/{cluster_id}",
    response_model=ClusterRead,
    operation_id="updateCluster",
    summary="Change a cluster (JSON merge patch)",
    responses=WRITE_ERRORS,
)
async def patch_cluster(
    cluster_id: ClusterRef,
    body: Annotated[
        ClusterPatch,
        Body(
            media_type="application/merge-patch+json",
            openapi_examples={
                "scale": {
                    "summary": "Scale the control plane",
                    "value": {"spec": {"controlPlane": {"replicas": 3}}},
                },
                "label": {
                    "summary": "Set and remove labels",
                    "value": {"labels": {"a": "1", "b": None}},
                },
            },
        ),
    ],
    session: SessionDep,
    principal: OperatorDep,
    if_match: IfMatch = None,
) -> ModelResponse:
    """Merge `labels` and `spec` into the cluster; a spec change bumps `generation`.

    Kubernetes upgrades go one minor version at a time (any patch within a minor); address
    ranges, DNS domain and etcd layout cannot change after creation.
    """
    return _cluster_response(await service.patch(session, cluster_id, body, if_match))


@router.delete(
    "/{cluster_id}",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ClusterRead,
    operation_id="deleteCluster",
    summary="Delete a cluster",
    responses=WRITE_ERRORS,
)
async def delete_cluster(
    cluster_id: ClusterRef,
    session: SessionDep,
    principal: OperatorDep,
    if_match: IfMatch = None,
) -> ModelResponse:
    """Mark the cluster `Deleting`; it disappears once the provisioner has removed it."""
    return _cluster_response(
        await service.delete(session, cluster_id, if_match), status.HTTP_202_ACCEPTED
    )


@router.get(
    "/{cluster_id}/kubeconfig",
    response_model=KubeconfigIssued,
    operation_id="getClusterKubeconfig",
    summary="Issue a short-lived admin kubeconfig",
    responses=errors(
        not_found=NOT_FOUND, unavailable="The provisioner or the cluster is unavailable."
    ),
)
async def get_kubeconfig(
    cluster_id: ClusterRef,
    request: Request,
    session: SessionDep,
    principal: OperatorDep,
    ttl_seconds: Annotated[
        int,
        Query(
            alias="ttlSeconds",
            ge=60,
            le=MAX_TTL_SECONDS,
            description="Certificate lifetime (default 8 h, at most 24 h).",
        ),
    ] = DEFAULT_TTL_SECONDS,
) -> ModelResponse:
    """A kubeconfig with a client certificate signed by the cluster CA (audited)."""
    cluster = await service.get(session, cluster_id)
    await session.close()  # do not hold the DB connection while the provisioner signs
    issued = await kubeconfig.issue(
        request.app.state.bus, cluster, requester=principal.name, ttl_seconds=ttl_seconds
    )
    return ModelResponse(issued, headers={"Cache-Control": "no-store"})
