"""Backups in the API: triggering one (a `RunBackup` intent staged in the outbox, published after
the commit), listing them, and projecting backup and drill events into the `backups` table.

Projection is idempotent and order-tolerant: a row is keyed by the backup's id (its folder
name), created by whichever event about it arrives first, its `state` only moves forward
(Running → Completed or Failed → Pruned), figures are filled from any event that carries them,
and a drill result replaces the last one only if it is newer. Redelivered and reordered events
therefore end in the same row.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from libs.common.contract.backup import (
    BackupCompleted,
    BackupFailed,
    BackupStarted,
    DrillFailed,
    DrillPassed,
    RunBackup,
)
from services.api.backup_locations import repository as locations
from services.api.backup_policies import repository as policies
from services.api.backups import repository
from services.api.backups.schemas import BackupAccepted, BackupRead, BackupRequest, DrillResult
from services.api.clusters import repository as clusters
from services.api.kit import outbox, paging
from services.api.kit.db import Session
from services.api.kit.paging import Page
from services.api.kit.problems import Conflict, FieldError, InvalidInput, NotFound
from services.api.models import Backup, utcnow

log = logging.getLogger(__name__)


_NAME = re.compile(r"^(?P<ts>\d{8}T\d{6}Z)-[a-z0-9]{8,32}$")
_TARGET = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,126}[a-z0-9])?$")
_RANK = {"Running": 0, "Completed": 1, "Failed": 1, "Pruned": 2}


def _storable(*values: str | None) -> bool:
    """Whether these could be stored at all: PostgreSQL refuses a NUL in a text parameter (a
    500 if sent), and no stored id or name holds one, so such a value matches nothing."""
    return not any(value is not None and "\x00" in value for value in values)


def _invalid(field: str, message: str) -> InvalidInput:
    return InvalidInput(
        f"invalid input: {field}: {message}", errors=[FieldError(field=field, message=message)]
    )


async def _check_policy(session: AsyncSession, policy_id: str) -> None:
    if not _storable(policy_id) or await policies.get(session, policy_id) is None:
        raise _invalid("policyId", f"backup policy {policy_id!r} does not exist")


async def request_backup(session: Session, body: BackupRequest) -> BackupAccepted:
    if body.policy_id is not None and body.location_id is not None:
        raise _invalid("locationId", "give policyId or locationId, not both")
    orm = await session.orm()
    if body.policy_id is not None:
        await _check_policy(orm, body.policy_id)
    if body.location_id is not None and (
        not _storable(body.location_id) or await locations.get(orm, body.location_id) is None
    ):
        raise _invalid("locationId", f"backup location {body.location_id!r} does not exist")
    if body.target == "cluster":
        storable = _storable(body.cluster_id)
        cluster = await clusters.get(session, body.cluster_id or "") if storable else None
        if cluster is None:
            raise _invalid("clusterId", f"cluster {body.cluster_id!r} does not exist")
        if cluster.deletion_requested_at is not None:
            raise Conflict(f"cluster {cluster.name!r} is being deleted")
        intent = RunBackup(
            target=f"cluster-{cluster.name}",
            kind="etcd",
            cluster_id=cluster.id,
            kubernetes_version=cluster.spec.get("kubernetesVersion"),
            policy_id=body.policy_id,
            location_id=body.location_id,
        )
    else:
        intent = RunBackup(
            target="foundry",
            kind="foundry",
            policy_id=body.policy_id,
            location_id=body.location_id,
        )
    envelope = outbox.stage(session, intent, subject=intent.target)
    log.info("backup requested", extra={"target": intent.target, "intentId": envelope.id})
    return BackupAccepted(
        intent_id=envelope.id,
        target=intent.target,
        kind=intent.kind,
        policy_id=intent.policy_id,
        location_id=intent.location_id,
    )


# Reading


def to_read(row: Backup) -> BackupRead:
    return BackupRead(
        id=row.id,
        ref=row.ref,
        target=row.target,
        kind=row.kind,
        cluster_id=row.cluster_id,
        policy_id=row.policy_id,
        location_id=row.location_id,
        state=row.state,
        trigger=row.trigger,
        created_at=row.created_at,
        started_at=row.started_at,
        completed_at=row.completed_at,
        failed_at=row.failed_at,
        pruned_at=row.pruned_at,
        stored_bytes=row.stored_bytes,
        plaintext_bytes=row.plaintext_bytes,
        stored_sha256=row.stored_sha256,
        plaintext_sha256=row.plaintext_sha256,
        encrypted=row.encrypted,
        encryption_key_id=row.encryption_key_id,
        verified=row.verified,
        etcd_revision=row.etcd_revision,
        etcd_key_count=row.etcd_key_count,
        kubernetes_version=row.kubernetes_version,
        duration_seconds=row.duration_seconds,
        reason=row.reason,
        message=row.message,
        last_drill=DrillResult.model_validate(row.last_drill) if row.last_drill else None,
    )


async def get(session: Session, backup_id: str) -> BackupRead:
    orm = await session.orm()
    row = await repository.get(orm, backup_id) if _storable(backup_id) else None
    if row is None:
        raise NotFound(f"backup {backup_id!r} not found")
    return to_read(row)


async def list_backups(
    session: Session,
    *,
    limit: int,
    cursor: str | None,
    target: str | None = None,
    cluster_id: str | None = None,
    policy_id: str | None = None,
    location_id: str | None = None,
    state: str | None = None,
) -> Page[BackupRead]:
    after = paging.after(cursor)
    if not _storable(target, cluster_id, policy_id, location_id, after[1] if after else None):
        return Page[BackupRead](items=[], next=None)
    rows = await repository.list_page(
        await session.orm(),
        limit=limit,
        after=after,
        target=target,
        cluster_id=cluster_id,
        policy_id=policy_id,
        location_id=location_id,
        state=state,
    )
    return paging.page_of(rows, limit, to_read, paging.by_created)


# Projection of backup events


def parse_ref(ref: str) -> tuple[str, str, datetime] | None:
    """(target, id, created) of `<target>/<YYYYMMDDTHHMMSSZ>-<id>`, or None if malformed."""
    target, _, name = ref.strip("/").partition("/")
    match = _NAME.match(name)
    if not _TARGET.match(target) or match is None:
        return None
    try:
        created = datetime.strptime(match["ts"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None
    return target, name, created


def _fill(row: Backup, **values: Any) -> None:
    """Set every given value that is known (None leaves what the row holds)."""
    for name, value in values.items():
        if value is not None:
            setattr(row, name, value)


def _advance(row: Backup, state: str) -> bool:
    """Move the row's state forward; never back (a late Started leaves Completed alone)."""
    if _RANK[state] > _RANK[row.state]:
        row.state = state
        return True
    return False


Change = Callable[[Backup], None]


async def _apply(session: AsyncSession, changes: list[tuple[str, str, Change]]) -> bool:
    """Apply `(ref, kind, change)` to each backup row (created if missing), in the caller's
    transaction (the caller commits)."""
    parsed = []
    for ref, kind, change in changes:
        found = parse_ref(ref)
        if found is None:
            log.warning("ignoring backup event with a malformed reference", extra={"ref": ref})
            continue
        parsed.append((ref, kind, change, found))
    if not parsed:
        return False
    # Rows are locked in one order (by id), so two events touching the same rows never deadlock.
    parsed.sort(key=lambda item: item[3][1])
    for _ref, kind, change, (target, backup_id, created) in parsed:
        row = await repository.get(session, backup_id, for_update=True)
        if row is None:
            row = Backup(
                id=backup_id,
                ref=f"{target}/{backup_id}",
                target=target,
                kind=kind,
                state="Running",
                created_at=created,
            )
            repository.add(session, row)
            # Flushed now: a concurrent insert by another replica fails here, the projector's
            # batch is retried, and the retry finds the row.
            await session.flush()
        change(row)
        row.updated_at = utcnow()
    return True


async def apply_started(session: AsyncSession, event: BackupStarted) -> bool:
    def change(row: Backup) -> None:
        _fill(
            row,
            cluster_id=event.cluster_id,
            policy_id=event.policy_id,
            location_id=event.location_id,
            trigger=event.trigger,
        )
        if row.started_at is None:
            row.started_at = event.started_at

    return await _apply(session, [(event.backup, event.kind, change)])


async def apply_completed(session: AsyncSession, event: BackupCompleted) -> bool:
    def change(row: Backup) -> None:
        _advance(row, "Completed")
        _fill(
            row,
            cluster_id=event.cluster_id,
            policy_id=event.policy_id,
            location_id=event.location_id,
            started_at=event.started_at,
            completed_at=event.completed_at,
            stored_bytes=event.stored_bytes,
            plaintext_bytes=event.plaintext_bytes,
            stored_sha256=event.stored_sha256,
            plaintext_sha256=event.plaintext_sha256,
            encrypted=event.encrypted,
            encryption_key_id=event.encryption_key_id,
            verified=event.verified,
            etcd_revision=event.etcd_revision,
            etcd_key_count=event.etcd_key_count,
            kubernetes_version=event.kubernetes_version,
            duration_seconds=event.duration_seconds,
        )

    def pruned(row: Backup) -> None:
        if _advance(row, "Pruned") or row.pruned_at is None:
            row.pruned_at = event.completed_at
        # The pruned backup lived in the same place as the one that replaced it.
        _fill(
            row,
            cluster_id=row.cluster_id or event.cluster_id,
            location_id=row.location_id or event.location_id,
        )

    changes: list[tuple[str, str, Change]] = [(event.backup, event.kind, change)]
    changes += [(ref, event.kind, pruned) for ref in event.pruned]
    return await _apply(session, changes)


async def apply_failed(session: AsyncSession, event: BackupFailed) -> bool:
    if event.backup is None:
        # Failed before a backup was named: the event history holds it; there is no row.
        return False

    def change(row: Backup) -> None:
        if _advance(row, "Failed") or row.state == "Failed":
            _fill(row, failed_at=event.failed_at, reason=event.reason, message=event.message)
        _fill(
            row,
            cluster_id=event.cluster_id,
            policy_id=event.policy_id,
            location_id=event.location_id,
        )

    return await _apply(session, [(event.backup, event.kind, change)])


def drill_record(event: DrillPassed | DrillFailed) -> dict[str, Any]:
    if isinstance(event, DrillPassed):
        figures: dict[str, Any] = {"durationSeconds": event.duration_seconds}
        if event.etcd_revision is not None:
            figures["etcdRevision"] = event.etcd_revision
        if event.etcd_key_count is not None:
            figures["etcdKeyCount"] = event.etcd_key_count
        if event.table_rows is not None:
            figures["tableRows"] = event.table_rows
        result = DrillResult(at=event.drilled_at, passed=True, figures=figures)
    else:
        result = DrillResult(
            at=event.drilled_at, passed=False, reason=event.reason, message=event.message
        )
    return result.model_dump(mode="json", by_alias=True)


async def apply_drill(session: AsyncSession, event: DrillPassed | DrillFailed) -> bool:
    """Record a drill on its backup. Only complete, verified backups are drilled, so a row
    the API has not seen yet (events lost, older than this database) is created Completed."""
    if event.backup is None:
        return False  # NoBackup: nothing to attach it to; the event history holds it.
    record = drill_record(event)

    def change(row: Backup) -> None:
        if row.state == "Running":
            row.state = "Completed"
            _fill(row, verified=True)
        _fill(row, location_id=row.location_id or event.location_id)
        held = row.last_drill
        if held is None or datetime.fromisoformat(held["at"]) <= event.drilled_at:
            row.last_drill = record

    return await _apply(session, [(event.backup, event.kind, change)])
