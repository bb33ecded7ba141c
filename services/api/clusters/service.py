"""Cluster domain logic: desired-state writes with their intents, and status projection.

Every write that needs the provisioner stages its intent (kit.outbox.stage) in the request's
unit of work, so the row and the intent commit together or not at all. A cluster is addressed
by its id or, where that is unambiguous, by its name.
"""

from __future__ import annotations

import functools
import json
import logging
import uuid
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from libs.common.contract.cluster import (
    ClusterDeclared,
    ClusterDeleted,
    ClusterSpec,
    ClusterStatusChanged,
    DeleteCluster,
    ReconcileCluster,
)
from libs.common.contract.versions import UpgradeRefused, check_upgrade
from services.api.clusters import repository
from services.api.clusters.repository import ClusterRow
from services.api.clusters.schemas import ClusterCreate, ClusterPatch, ClusterRead, ClusterStatus
from services.api.kit import outbox, paging, selectors
from services.api.kit.clock import utcnow
from services.api.kit.db import IntegrityError, Session
from services.api.kit.etag import check_if_match
from services.api.kit.paging import Page
from services.api.kit.patch import check_name_unchanged, merge_patch, patched_labels
from services.api.kit.problems import (
    Conflict,
    FieldError,
    InvalidInput,
    NotFound,
    invalid_from_validation,
)

log = logging.getLogger(__name__)

# Fields Kubernetes (or a StatefulSet's volume claim templates) cannot change after creation.
IMMUTABLE_SPEC_FIELDS: tuple[tuple[str, ...], ...] = (
    ("network", "podCidr"),
    ("network", "serviceCidr"),
    ("network", "dnsDomain"),
    ("datastore", "kind"),
    ("datastore", "replicas"),
    ("datastore", "storageSize"),
    ("datastore", "storageClassName"),
)


@functools.lru_cache(maxsize=4096)
def _stored_spec(canonical: str) -> ClusterSpec:
    """A stored spec as a model. Specs repeat across clusters and validating CIDRs is costly,
    so each distinct spec is validated once (responses only read the model, never mutate it)."""
    return ClusterSpec.model_validate_json(canonical)


def to_read(cluster: ClusterRow) -> ClusterRead:
    return ClusterRead(
        id=cluster.id,
        name=cluster.name,
        labels=dict(cluster.labels),
        spec=_stored_spec(json.dumps(cluster.spec, sort_keys=True, separators=(",", ":"))),
        generation=cluster.generation,
        resource_version=str(cluster.version),
        created_at=cluster.created_at,
        updated_at=cluster.updated_at,
        status=ClusterStatus.model_validate(
            {
                "phase": cluster.phase,
                "observedGeneration": cluster.observed_generation,
                "reason": cluster.status_reason,
                "message": cluster.status_message,
                "conditions": cluster.conditions,
                "endpoint": cluster.endpoint,
            }
        ),
    )


def _lookup(spec: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = spec
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _stage_reconcile(session: Session, cluster: ClusterRow) -> None:
    intent = ReconcileCluster(
        cluster_id=cluster.id,
        name=cluster.name,
        generation=cluster.generation,
        labels=dict(cluster.labels),
        spec=ClusterSpec.model_validate(cluster.spec),
    )
    outbox.stage(session, intent, subject=cluster.id)


def _stage_declared(session: Session, cluster: ClusterRow) -> None:
    """The ClusterDeclared event (the backup service follows the set of clusters from it)."""
    event = ClusterDeclared(
        cluster_id=cluster.id,
        name=cluster.name,
        generation=cluster.generation,
        kubernetes_version=str(cluster.spec.get("kubernetesVersion", "")),
        labels=dict(cluster.labels),
        deletion_requested=cluster.deletion_requested_at is not None,
    )
    outbox.stage(session, event, subject=cluster.id)


async def create(session: Session, body: ClusterCreate) -> ClusterRead:
    now = utcnow()
    cluster = ClusterRow(
        id=str(uuid.uuid4()),
        name=body.name,
        labels=dict(body.labels),
        spec=body.spec.wire(),
        generation=1,
        created_at=now,
        updated_at=now,
        deletion_requested_at=None,
        phase="Pending",
        observed_generation=0,
        status_reason="",
        status_message="waiting for the provisioner",
        conditions=[],
        endpoint=None,
        status_sequence=0,
        version=1,
    )
    try:
        await repository.insert(session, cluster)
    except IntegrityError:
        raise Conflict(f"a cluster named {body.name!r} already exists") from None
    _stage_reconcile(session, cluster)
    _stage_declared(session, cluster)
    log.info("cluster created", extra={"clusterId": cluster.id, "cluster": cluster.name})
    return to_read(cluster)


def not_found(ref: str) -> NotFound:
    return NotFound(
        f"cluster {ref!r} does not exist (looked up by id, then by name); "
        "GET /api/v1/clusters lists them"
    )


async def get(session: Session, ref: str) -> ClusterRead:
    """A cluster by id or name."""
    return to_read(await require(session, ref))


async def require(session: Session, ref: str, *, for_update: bool = False) -> ClusterRow:
    """The cluster with this id or, failing that, this name; 404 if neither."""
    cluster = await repository.find(session, ref, for_update=for_update)
    if cluster is None:
        raise not_found(ref)
    return cluster


async def list_clusters(
    session: Session,
    *,
    limit: int,
    cursor: str | None,
    selector: str | None = None,
    phase: str | None = None,
) -> Page[ClusterRead]:
    requirements = selectors.parse(selector) if selector else []
    rows = await repository.list_page(
        session, limit=limit, after=paging.after(cursor), selector=requirements, phase=phase
    )
    return paging.page_of(rows, limit, to_read, paging.by_created)


def _check_precondition(cluster: ClusterRow, if_match: str | None) -> None:
    check_if_match(if_match, cluster.version, f"cluster {cluster.name!r}")


async def patch(
    session: Session, ref: str, body: ClusterPatch, if_match: str | None = None
) -> ClusterRead:
    cluster = await require(session, ref, for_update=True)
    _check_precondition(cluster, if_match)
    if cluster.deletion_requested_at is not None:
        raise Conflict(f"cluster {cluster.name!r} is being deleted and cannot be changed")
    check_name_unchanged(cluster.name, body.name)
    changed = False
    labels = patched_labels(cluster.labels, body.labels)
    if labels is not None:
        cluster.labels = labels
        changed = True
    if body.spec is not None:
        new_spec = _validated_spec(cluster.spec, body.spec)
        if new_spec != cluster.spec:
            cluster.spec = new_spec
            cluster.generation += 1
            _stage_declared(session, cluster)
            changed = True
    if not changed:
        return to_read(cluster)
    cluster.version += 1
    cluster.updated_at = utcnow()
    await repository.update(session, cluster)
    # Labels travel in the intent too, so a label change is also sent to the provisioner.
    _stage_reconcile(session, cluster)
    return to_read(cluster)


def _validated_spec(current: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    merged = merge_patch(current, patch)
    try:
        spec = ClusterSpec.model_validate(merged).wire()
    except ValidationError as exc:
        raise invalid_from_validation(exc, prefix=("spec",)) from None
    errors = [
        FieldError(field="spec." + ".".join(path), message="cannot be changed after creation")
        for path in IMMUTABLE_SPEC_FIELDS
        if _lookup(spec, path) != _lookup(current, path)
    ]
    try:
        check_upgrade(str(current["kubernetesVersion"]), str(spec["kubernetesVersion"]))
    except UpgradeRefused as exc:
        errors.append(FieldError(field="spec.kubernetesVersion", message=str(exc)))
    if errors:
        summary = "; ".join(f"{e.field}: {e.message}" for e in errors)
        raise InvalidInput(f"invalid input: {summary}", errors=errors)
    return spec


async def delete(session: Session, ref: str, if_match: str | None = None) -> ClusterRead:
    """Mark the cluster Deleting and ask the provisioner to remove it (idempotent)."""
    cluster = await require(session, ref, for_update=True)
    _check_precondition(cluster, if_match)
    if cluster.deletion_requested_at is not None:
        return to_read(cluster)
    now = utcnow()
    cluster.version += 1
    cluster.deletion_requested_at = now
    cluster.updated_at = now
    cluster.phase = "Deleting"
    cluster.status_reason = "DeletionRequested"
    cluster.status_message = "waiting for the provisioner to remove the control plane"
    await repository.update(session, cluster)
    intent = DeleteCluster(cluster_id=cluster.id, name=cluster.name, generation=cluster.generation)
    outbox.stage(session, intent, subject=cluster.id)
    _stage_declared(session, cluster)
    return to_read(cluster)


# Projection of provisioner events into the Foundry DB (in the projector's transaction).


def _is_stale(cluster: ClusterRow, event: ClusterStatusChanged, sequence: int) -> bool:
    return (
        sequence <= cluster.status_sequence
        or event.observed_generation < cluster.observed_generation
    )


async def apply_statuses(
    session: Session, events: Sequence[tuple[ClusterStatusChanged, int]]
) -> int:
    """Apply status events in stream order, each unless it is stale; returns how many applied.

    Stale means older than what the row holds: a stream sequence at or below the last applied
    one, or a lower observed generation. Several events about one cluster in a batch are
    applied in order in memory, and the row is written once."""
    ids = list(dict.fromkeys(event.cluster_id for event, _ in events))
    rows = await repository.for_update_many(session, ids)
    changed: dict[str, ClusterRow] = {}
    applied = 0
    for event, sequence in events:
        cluster = rows.get(event.cluster_id)
        if cluster is None:
            continue
        if _is_stale(cluster, event, sequence):
            log.info(
                "ignoring stale status event",
                extra={
                    "clusterId": cluster.id,
                    "sequence": sequence,
                    "held": cluster.status_sequence,
                },
            )
            continue
        cluster.observed_generation = event.observed_generation
        cluster.status_sequence = sequence
        # A cluster being deleted stays Deleting whatever an older reconcile still reports.
        cluster.phase = "Deleting" if cluster.deletion_requested_at is not None else event.phase
        cluster.status_reason = event.reason
        cluster.status_message = event.message
        cluster.conditions = [c.wire() for c in event.conditions]
        cluster.endpoint = event.endpoint.wire() if event.endpoint else None
        changed[cluster.id] = cluster
        applied += 1
    for cluster in changed.values():
        await repository.update_status(session, cluster)
    return applied


async def apply_status(session: Session, event: ClusterStatusChanged, sequence: int) -> bool:
    """Apply one status event unless it is stale; returns whether anything changed."""
    return await apply_statuses(session, [(event, sequence)]) > 0


async def apply_deleted(session: Session, event: ClusterDeleted) -> bool:
    """Remove the row once the provisioner reports the cluster gone (only if deletion was asked)."""
    cluster = await repository.get(session, event.cluster_id, for_update=True)
    if cluster is None:
        return False
    if cluster.deletion_requested_at is None:
        log.warning(
            "ignoring deleted event for a cluster nobody deleted", extra={"clusterId": cluster.id}
        )
        return False
    await repository.remove(session, cluster.id)
    return True
