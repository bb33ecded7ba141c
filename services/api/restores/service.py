"""Cluster restores in the API: requesting one (checked against the backups the API knows, a
`PrepareRestore` intent staged in the outbox in the same transaction), reading them, and
projecting `RestoreProgressed` events onto them.

The flow behind it is in `libs/common/contract/restore.py`: the backup service verifies and
stages the snapshot, the provisioner restores every etcd member; both report each phase.

Projection is idempotent and order-tolerant: a phase is applied only if it is further along
than the one held (Failed is further than anything unfinished), so a redelivered or late
event never moves a restore back, and nothing moves a restore that Succeeded or Failed; the
history still records a late phase in its place.
"""

from __future__ import annotations

import logging
import uuid

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from libs.common.contract.restore import (
    TERMINAL_RESTORE_PHASES,
    PrepareRestore,
    RestoreProgressed,
)
from services.api.backups import repository as backups
from services.api.clusters import service as clusters
from services.api.clusters.repository import ClusterRow
from services.api.kit import outbox, paging
from services.api.kit.db import Session
from services.api.kit.paging import Page
from services.api.kit.problems import Conflict, FieldError, InvalidInput, NotFound
from services.api.models import Restore, utcnow
from services.api.restores import repository
from services.api.restores.schemas import RestoreCreate, RestoreRead, RestoreStep

log = logging.getLogger(__name__)


RANK = {
    "Pending": 0,
    "Verifying": 1,
    "Staged": 2,
    "ScalingDown": 3,
    "Restoring": 4,
    "ScalingUp": 5,
    "Succeeded": 6,
    "Failed": 6,
}


def _storable(*values: str | None) -> bool:
    """Whether these could be stored at all: PostgreSQL refuses a NUL in a text parameter (a
    500 if sent), and no stored id holds one, so such a value matches nothing."""
    return not any(value is not None and "\x00" in value for value in values)


def _invalid(field: str, message: str) -> InvalidInput:
    return InvalidInput(
        f"invalid input: {field}: {message}", errors=[FieldError(field=field, message=message)]
    )


async def request_restore(session: Session, cluster_ref: str, body: RestoreCreate) -> RestoreRead:
    orm = await session.orm()
    cluster = await _cluster(session, cluster_ref)
    if cluster.deletion_requested_at is not None:
        raise Conflict(f"cluster {cluster.name!r} is being deleted")
    backup = await backups.get(orm, body.backup_id)
    if backup is None:
        raise _invalid("backupId", f"backup {body.backup_id!r} does not exist")
    if backup.kind != "etcd":
        raise _invalid("backupId", f"backup {body.backup_id!r} is a {backup.kind} backup, not etcd")
    if backup.state != "Completed":
        raise _invalid(
            "backupId",
            f"backup {body.backup_id!r} is {backup.state}; only a Completed backup can be restored",
        )
    target = f"cluster-{cluster.name}"
    if backup.target != target and not body.force:
        raise _invalid(
            "backupId",
            f"backup {body.backup_id!r} is of {backup.target!r}, not of this cluster ({target!r}); "
            "set force to restore it anyway",
        )
    active = await repository.active_for(orm, cluster.id)
    if active is not None:
        raise Conflict(f"restore {active.id} of cluster {cluster.name!r} is still {active.phase}")
    now = utcnow()
    row = Restore(
        id=str(uuid.uuid4()),
        cluster_id=cluster.id,
        cluster_name=cluster.name,
        backup_id=backup.id,
        backup_ref=backup.ref,
        location_id=backup.location_id,
        force=body.force,
        phase="Pending",
        reason="",
        message="",
        etcd_revision=backup.etcd_revision,
        history=[RestoreStep(phase="Pending", at=now).model_dump(mode="json", by_alias=True)],
        active_cluster_id=cluster.id,
        created_at=now,
        updated_at=now,
    )
    repository.add(orm, row)
    intent = PrepareRestore(
        restore_id=row.id,
        cluster_id=cluster.id,
        cluster_name=cluster.name,
        backup=backup.ref,
        location_id=backup.location_id,
        force=body.force,
    )
    outbox.stage(session, intent, subject=row.id)
    try:
        await orm.flush()
    except IntegrityError:
        # Another request started a restore of this cluster between our check and this write.
        raise Conflict(f"a restore of cluster {cluster.name!r} is already under way") from None
    log.info(
        "restore requested",
        extra={"restoreId": row.id, "clusterId": cluster.id, "backup": backup.ref},
    )
    return to_read(row)


# Reading


def to_read(row: Restore) -> RestoreRead:
    return RestoreRead(
        id=row.id,
        cluster_id=row.cluster_id,
        backup_id=row.backup_id,
        backup_ref=row.backup_ref,
        location_id=row.location_id,
        force=row.force,
        phase=row.phase,
        reason=row.reason,
        message=row.message,
        etcd_revision=row.etcd_revision,
        history=[RestoreStep.model_validate(step) for step in row.history or []],
        created_at=row.created_at,
        updated_at=row.updated_at,
        finished_at=row.finished_at,
    )


async def _cluster(session: Session, cluster_ref: str) -> ClusterRow:
    """The cluster by id or name (404 if neither)."""
    if not _storable(cluster_ref):
        raise clusters.not_found(cluster_ref)
    return await clusters.require(session, cluster_ref)


async def get(session: Session, cluster_ref: str, restore_id: str) -> RestoreRead:
    cluster = await _cluster(session, cluster_ref)
    orm = await session.orm()
    row = await repository.get(orm, restore_id) if _storable(restore_id) else None
    if row is None or row.cluster_id != cluster.id:
        raise NotFound(f"restore {restore_id!r} of cluster {cluster_ref!r} not found by id")
    return to_read(row)


async def list_restores(
    session: Session, cluster_ref: str, *, limit: int, cursor: str | None
) -> Page[RestoreRead]:
    cluster = await _cluster(session, cluster_ref)
    after = paging.after(cursor)
    if not _storable(after[1] if after else None):
        return Page[RestoreRead](items=[], next=None)
    rows = await repository.list_page(await session.orm(), cluster.id, limit=limit, after=after)
    return paging.page_of(rows, limit, to_read, paging.by_created)


# Projection


async def apply_progress(session: AsyncSession, event: RestoreProgressed) -> bool:
    """Project one progress event; True if the restore changed.

    The phase (with reason, message, revision) moves only forward, and never once the restore
    Succeeded or Failed. The history records each phase reported, once, in phase order, also
    when its event arrives after a later one (the projector handles events concurrently), but
    never a second outcome."""
    row = await repository.get(session, event.restore_id, for_update=True)
    if row is None:
        log.info("ignoring progress of an unknown restore", extra={"restoreId": event.restore_id})
        return False
    changed = False
    history = list(row.history or [])
    seen = {step["phase"] for step in history}
    outcome_known = bool(seen & TERMINAL_RESTORE_PHASES)
    if event.phase not in seen and not (event.phase in TERMINAL_RESTORE_PHASES and outcome_known):
        step = RestoreStep(
            phase=event.phase, at=event.at, reason=event.reason, message=event.message
        ).model_dump(mode="json", by_alias=True)
        row.history = sorted([*history, step], key=lambda item: RANK[item["phase"]])
        changed = True
    if row.phase not in TERMINAL_RESTORE_PHASES and RANK[event.phase] > RANK[row.phase]:
        row.phase = event.phase
        row.reason = event.reason
        row.message = event.message
        if event.phase in TERMINAL_RESTORE_PHASES:
            row.finished_at = event.at
            row.active_cluster_id = None
        changed = True
    if event.etcd_revision is not None and row.etcd_revision != event.etcd_revision:
        # The snapshot's own revision (every event of a restore that carries one agrees),
        # whatever the order the events arrive in; before it, the backup's.
        row.etcd_revision = event.etcd_revision
        changed = True
    if not changed:
        return False
    row.updated_at = utcnow()
    return True
