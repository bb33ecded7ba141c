"""Cluster domain logic: desired-state writes with their intents, and status projection.

Every write that needs the provisioner stages its intent in the outbox inside the same
transaction, so the row and the intent commit together or not at all.
"""

from __future__ import annotations

import functools
import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from libs.common.contract import envelope_for
from libs.common.contract.cluster import (
    ClusterDeclared,
    ClusterDeleted,
    ClusterSpec,
    ClusterStatusChanged,
    DeleteCluster,
    ReconcileCluster,
    validate_labels,
)
from libs.common.contract.versions import UpgradeRefused, check_upgrade
from libs.common.logging import correlation_id
from services.api import selectors
from services.api.clusters import repository
from services.api.clusters.schemas import ClusterCreate, ClusterPatch, ClusterRead, ClusterStatus
from services.api.merge_patch import merge_patch
from services.api.models import Cluster, utcnow
from services.api.outbox import repository as outbox
from services.api.pagination import Cursor, Page
from services.api.problems import (
    Conflict,
    FieldError,
    InvalidInput,
    NotFound,
    PreconditionFailed,
    invalid_from_validation,
)

log = logging.getLogger(__name__)

SOURCE = "api"

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

Notify = Callable[[], None]


@functools.lru_cache(maxsize=4096)
def _stored_spec(canonical: str) -> ClusterSpec:
    """A stored spec as a model. Specs repeat across clusters and validating CIDRs is costly,
    so each distinct spec is validated once (responses only read the model, never mutate it)."""
    return ClusterSpec.model_validate_json(canonical)


def to_read(cluster: Cluster) -> ClusterRead:
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


def _stage_reconcile(session: AsyncSession, cluster: Cluster) -> None:
    intent = ReconcileCluster(
        cluster_id=cluster.id,
        name=cluster.name,
        generation=cluster.generation,
        labels=dict(cluster.labels),
        spec=ClusterSpec.model_validate(cluster.spec),
    )
    subject, envelope = envelope_for(
        intent, source=SOURCE, subject=cluster.id, correlation_id=correlation_id.get()
    )
    outbox.add(session, subject, envelope)


def _stage_declared(session: AsyncSession, cluster: Cluster) -> None:
    """The ClusterDeclared event (the backup service follows the set of clusters from it)."""
    event = ClusterDeclared(
        cluster_id=cluster.id,
        name=cluster.name,
        generation=cluster.generation,
        kubernetes_version=str(cluster.spec.get("kubernetesVersion", "")),
        labels=dict(cluster.labels),
        deletion_requested=cluster.deletion_requested_at is not None,
    )
    subject, envelope = envelope_for(
        event, source=SOURCE, subject=cluster.id, correlation_id=correlation_id.get()
    )
    outbox.add(session, subject, envelope)


async def _commit(session: AsyncSession, name: str) -> None:
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise Conflict(f"a cluster named {name!r} already exists") from None


async def create(session: AsyncSession, body: ClusterCreate, notify: Notify) -> ClusterRead:
    if await repository.get_by_name(session, body.name) is not None:
        raise Conflict(f"a cluster named {body.name!r} already exists")
    now = utcnow()
    cluster = Cluster(
        id=str(uuid.uuid4()),
        name=body.name,
        labels=dict(body.labels),
        spec=body.spec.wire(),
        generation=1,
        created_at=now,
        updated_at=now,
        phase="Pending",
        observed_generation=0,
        status_reason="",
        status_message="waiting for the provisioner",
        conditions=[],
        endpoint=None,
        status_sequence=0,
        version=1,
    )
    repository.add(session, cluster)
    _stage_reconcile(session, cluster)
    _stage_declared(session, cluster)
    await _commit(session, body.name)
    notify()
    log.info("cluster created", extra={"clusterId": cluster.id, "cluster": cluster.name})
    return to_read(cluster)


async def get(session: AsyncSession, cluster_id: str) -> ClusterRead:
    return to_read(await _require(session, cluster_id))


async def _require(session: AsyncSession, cluster_id: str, *, for_update: bool = False) -> Cluster:
    cluster = await repository.get(session, cluster_id, for_update=for_update)
    if cluster is None:
        raise NotFound(f"cluster {cluster_id!r} does not exist")
    return cluster


async def list_clusters(
    session: AsyncSession,
    *,
    limit: int,
    cursor: str | None,
    selector: str | None = None,
    phase: str | None = None,
) -> Page[ClusterRead]:
    after = None
    if cursor:
        position = Cursor.decode(cursor)
        after = (position.created_at, position.id)
    requirements = selectors.parse(selector) if selector else []
    rows = await repository.list_page(
        session, limit=limit, after=after, selector=requirements, phase=phase
    )
    items = [to_read(row) for row in rows[:limit]]
    following = None
    if len(rows) > limit:
        last = rows[limit - 1]
        following = Cursor(created_at=last.created_at, id=last.id).encode()
    return Page[ClusterRead](items=items, next=following)


def etag(version: int | str) -> str:
    return f'"{version}"'


def _check_precondition(cluster: Cluster, if_match: str | None) -> None:
    """If-Match: a list of ETags or `*`; 412 when the cluster has changed since."""
    if if_match is None:
        return
    wanted = {tag.strip().removeprefix("W/") for tag in if_match.split(",")}
    if "*" in wanted or etag(cluster.version) in wanted:
        return
    raise PreconditionFailed(
        f"cluster {cluster.name!r} has changed (ETag {etag(cluster.version)}); "
        "read it again and retry"
    )


async def patch(
    session: AsyncSession,
    cluster_id: str,
    body: ClusterPatch,
    notify: Notify,
    if_match: str | None = None,
) -> ClusterRead:
    cluster = await _require(session, cluster_id, for_update=True)
    _check_precondition(cluster, if_match)
    if cluster.deletion_requested_at is not None:
        raise Conflict(f"cluster {cluster.name!r} is being deleted and cannot be changed")
    if body.name is not None and body.name != cluster.name:
        raise InvalidInput(
            "name cannot be changed",
            errors=[FieldError(field="name", message="cannot be changed after creation")],
        )
    changed = False
    if body.labels is not None:
        labels = merge_patch(dict(cluster.labels), body.labels)
        try:
            validate_labels(labels)
        except ValueError as exc:
            raise InvalidInput(
                f"invalid input: labels: {exc}",
                errors=[FieldError(field="labels", message=str(exc))],
            ) from None
        if labels != cluster.labels:
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
    # Labels travel in the intent too, so a label change is also sent to the provisioner.
    _stage_reconcile(session, cluster)
    await _commit(session, cluster.name)
    notify()
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


async def delete(
    session: AsyncSession, cluster_id: str, notify: Notify, if_match: str | None = None
) -> ClusterRead:
    """Mark the cluster Deleting and ask the provisioner to remove it (idempotent)."""
    cluster = await _require(session, cluster_id, for_update=True)
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
    intent = DeleteCluster(cluster_id=cluster.id, name=cluster.name, generation=cluster.generation)
    subject, envelope = envelope_for(
        intent, source=SOURCE, subject=cluster.id, correlation_id=correlation_id.get()
    )
    outbox.add(session, subject, envelope)
    _stage_declared(session, cluster)
    await session.commit()
    notify()
    return to_read(cluster)


# Projection of provisioner events into the Foundry DB.


async def apply_status(session: AsyncSession, event: ClusterStatusChanged, sequence: int) -> bool:
    """Apply a status event unless it is stale; returns whether anything changed."""
    cluster = await repository.get(session, event.cluster_id, for_update=True)
    if cluster is None:
        return False
    if (
        sequence <= cluster.status_sequence
        or event.observed_generation < cluster.observed_generation
    ):
        log.info(
            "ignoring stale status event",
            extra={"clusterId": cluster.id, "sequence": sequence, "held": cluster.status_sequence},
        )
        return False
    cluster.observed_generation = event.observed_generation
    cluster.status_sequence = sequence
    # A cluster being deleted stays Deleting whatever an older reconcile still reports.
    cluster.phase = "Deleting" if cluster.deletion_requested_at is not None else event.phase
    cluster.status_reason = event.reason
    cluster.status_message = event.message
    cluster.conditions = [c.wire() for c in event.conditions]
    cluster.endpoint = event.endpoint.wire() if event.endpoint else None
    await session.commit()
    return True


async def apply_deleted(session: AsyncSession, event: ClusterDeleted) -> bool:
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
    await session.commit()
    return True
