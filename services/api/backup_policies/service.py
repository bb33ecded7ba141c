"""Backup policies: desired state with its intents for the backup service, in one transaction.

Every write that changes a policy's spec stages `ApplyBackupPolicy` (or `DeleteBackupPolicy`)
in the outbox with the row, so the backup service's copy follows every committed change
(`sync.restage_all` stages everything again at API start).
"""

from __future__ import annotations

import logging
import re
import uuid

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from libs.common.contract.backup_policy import (
    ApplyBackupPolicy,
    BackupPolicySpec,
    DeleteBackupPolicy,
    PolicyTargets,
    RetentionSpec,
)
from libs.common.cron import CronError, CronSchedule
from services.api.backup_policies import repository
from services.api.backup_policies.schemas import (
    BackupPolicyCreate,
    BackupPolicyPatch,
    BackupPolicyRead,
)
from services.api.clusters import repository as clusters
from services.api.kit import outbox, paging
from services.api.kit.db import Session
from services.api.kit.etag import check_if_match
from services.api.kit.paging import Page
from services.api.kit.patch import check_name_unchanged, patched_labels, patched_spec
from services.api.kit.problems import Conflict, FieldError, InvalidInput, NotFound
from services.api.models import BackupPolicy, utcnow

log = logging.getLogger(__name__)

DEFAULT_POLICY_NAME = "default"
DEFAULT_SCHEDULE = "0 * * * *"

ID_PATTERN = re.compile(r"^[A-Za-z0-9-]{1,36}$")
"""What a stored id can look like; anything else cannot exist and is not sent to the database
(PostgreSQL refuses, e.g., a NUL in a query parameter)."""


def to_read(row: BackupPolicy) -> BackupPolicyRead:
    return BackupPolicyRead(
        id=row.id,
        name=row.name,
        labels=dict(row.labels),
        spec=BackupPolicySpec.model_validate(row.spec),
        generation=row.generation,
        resource_version=str(row.version),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _check_precondition(row: BackupPolicy, if_match: str | None) -> None:
    check_if_match(if_match, row.version, f"backup policy {row.name!r}")


def stage_apply(session: Session, row: BackupPolicy) -> None:
    intent = ApplyBackupPolicy(
        policy_id=row.id,
        name=row.name,
        generation=row.generation,
        spec=BackupPolicySpec.model_validate(row.spec),
    )
    outbox.stage(session, intent, subject=row.id)


async def _check_references(
    session: Session, spec: BackupPolicySpec, previous: BackupPolicySpec | None
) -> None:
    """422 naming each field whose schedule does not parse or whose reference does not exist.

    Cluster ids already in the stored spec are not checked again: a cluster deleted since
    must not make the policy unchangeable."""
    errors: list[FieldError] = []
    for field, expression in (
        ("spec.schedule", spec.schedule),
        ("spec.drillSchedule", spec.drill_schedule),
    ):
        if expression is None:
            continue
        try:
            CronSchedule.parse(expression)
        except CronError as exc:
            errors.append(FieldError(field=field, message=str(exc)))
    if (previous is None or previous.location_id != spec.location_id) and not (
        ID_PATTERN.match(spec.location_id)
        and await repository.location_exists(await session.orm(), spec.location_id)
    ):
        errors.append(
            FieldError(
                field="spec.locationId",
                message=f"backup location {spec.location_id!r} does not exist",
            )
        )
    known = set(previous.targets.cluster_ids) if previous else set()
    new = [c for c in spec.targets.cluster_ids if c not in known]
    live = await clusters.live_ids(session, [c for c in new if ID_PATTERN.match(c)])
    for index, cluster_id in enumerate(spec.targets.cluster_ids):
        if cluster_id in new and cluster_id not in live:
            errors.append(
                FieldError(
                    field=f"spec.targets.clusterIds.{index}",
                    message=f"cluster {cluster_id!r} does not exist or is being deleted",
                )
            )
    if errors:
        summary = "; ".join(f"{e.field}: {e.message}" for e in errors)
        raise InvalidInput(f"invalid input: {summary}", errors=errors)


async def _flush(session: AsyncSession, name: str) -> None:
    try:
        await session.flush()
    except IntegrityError:
        raise Conflict(
            f"a backup policy named {name!r} already exists, or its location was just deleted"
        ) from None


async def _require(session: Session, policy_id: str, *, for_update: bool = False) -> BackupPolicy:
    orm = await session.orm()
    row = await repository.get(orm, policy_id, for_update=for_update)
    if row is None:
        row = await repository.get_by_name(orm, policy_id)
    if row is None:
        raise NotFound(
            f"backup policy {policy_id!r} does not exist (looked up by id, then by name)"
        )
    return row


def _new_row(name: str, labels: dict[str, str], spec: BackupPolicySpec) -> BackupPolicy:
    now = utcnow()
    return BackupPolicy(
        id=str(uuid.uuid4()),
        name=name,
        labels=dict(labels),
        spec=spec.wire(),
        location_id=spec.location_id,
        generation=1,
        version=1,
        created_at=now,
        updated_at=now,
    )


async def create(session: Session, body: BackupPolicyCreate) -> BackupPolicyRead:
    orm = await session.orm()
    if await repository.get_by_name(orm, body.name) is not None:
        raise Conflict(f"a backup policy named {body.name!r} already exists")
    await _check_references(session, body.spec, None)
    row = _new_row(body.name, body.labels, body.spec)
    repository.add(orm, row)
    stage_apply(session, row)
    await _flush(orm, body.name)
    log.info("backup policy created", extra={"policyId": row.id, "policy": row.name})
    return to_read(row)


def default_spec(location_id: str) -> BackupPolicySpec:
    """The policy created with the first location: hourly, the Foundry DB and every cluster."""
    return BackupPolicySpec(
        schedule=DEFAULT_SCHEDULE,
        targets=PolicyTargets(foundry=True, all_clusters=True),
        location_id=location_id,
        retention=RetentionSpec(keep_last=24, keep_days=7),
        encrypted=False,
    )


async def add_default_if_none(session: Session, location_id: str) -> BackupPolicy | None:
    """In the caller's transaction: the `default` policy on `location_id` if no policy exists.

    The caller adds the location row first (the policy refers to it) and commits both."""
    orm = await session.orm()
    if await repository.count(orm) > 0:
        return None
    row = _new_row(DEFAULT_POLICY_NAME, {}, default_spec(location_id))
    repository.add(orm, row)
    stage_apply(session, row)
    log.info("default backup policy created", extra={"policyId": row.id})
    return row


async def names_using_location(session: Session, location_id: str) -> list[str]:
    return await repository.names_using_location(await session.orm(), location_id)


async def get(session: Session, policy_id: str) -> BackupPolicyRead:
    return to_read(await _require(session, policy_id))


async def list_policies(
    session: Session, *, limit: int, cursor: str | None
) -> Page[BackupPolicyRead]:
    rows = await repository.list_page(await session.orm(), limit=limit, after=paging.after(cursor))
    return paging.page_of(rows, limit, to_read, paging.by_created)


async def patch(
    session: Session,
    policy_id: str,
    body: BackupPolicyPatch,
    if_match: str | None = None,
) -> BackupPolicyRead:
    row = await _require(session, policy_id, for_update=True)
    _check_precondition(row, if_match)
    check_name_unchanged(row.name, body.name)
    changed = False
    labels = patched_labels(dict(row.labels), body.labels)
    if labels is not None:
        row.labels = labels
        changed = True
    if body.spec is not None:
        current = BackupPolicySpec.model_validate(row.spec)
        spec = patched_spec(BackupPolicySpec, dict(row.spec), body.spec)
        if spec != current:
            await _check_references(session, spec, current)
            row.spec = spec.wire()
            row.location_id = spec.location_id
            row.generation += 1
            stage_apply(session, row)
            changed = True
    if not changed:
        return to_read(row)
    row.version += 1
    row.updated_at = utcnow()
    await _flush(await session.orm(), row.name)
    log.info("backup policy changed", extra={"policyId": row.id, "policy": row.name})
    return to_read(row)


async def delete(session: Session, policy_id: str, if_match: str | None = None) -> None:
    """Forget the policy (its backups stay in the store) and tell the backup service."""
    row = await _require(session, policy_id, for_update=True)
    _check_precondition(row, if_match)
    intent = DeleteBackupPolicy(policy_id=row.id, generation=row.generation)
    outbox.stage(session, intent, subject=row.id)
    await repository.remove(await session.orm(), row.id)
    log.info("backup policy deleted", extra={"policyId": row.id, "policy": row.name})
