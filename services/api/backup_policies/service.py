"""Backup policies: desired state with its intents for the backup service, in one transaction.

Every write that changes a policy's spec stages `ApplyBackupPolicy` (or `DeleteBackupPolicy`)
in the outbox with the row, so the backup service's copy follows every committed change
(`sync.restage_all` stages everything again at API start).
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from libs.common.contract import envelope_for
from libs.common.contract.backup_policy import (
    ApplyBackupPolicy,
    BackupPolicySpec,
    DeleteBackupPolicy,
    PolicyTargets,
    RetentionSpec,
)
from libs.common.contract.base import WireModel
from libs.common.contract.cluster import validate_labels
from libs.common.cron import CronError, CronSchedule
from libs.common.logging import correlation_id
from services.api.backup_policies import repository
from services.api.backup_policies.schemas import (
    BackupPolicyCreate,
    BackupPolicyPatch,
    BackupPolicyRead,
)
from services.api.merge_patch import merge_patch
from services.api.models import BackupPolicy, utcnow
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
DEFAULT_POLICY_NAME = "default"
DEFAULT_SCHEDULE = "0 * * * *"

Notify = Callable[[], None]
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


def etag(version: int | str) -> str:
    return f'"{version}"'


def _check_precondition(row: BackupPolicy, if_match: str | None) -> None:
    """If-Match: a list of ETags or `*`; 412 when the policy has changed since."""
    if if_match is None:
        return
    wanted = {tag.strip().removeprefix("W/") for tag in if_match.split(",")}
    if "*" in wanted or etag(row.version) in wanted:
        return
    raise PreconditionFailed(
        f"backup policy {row.name!r} has changed (ETag {etag(row.version)}); "
        "read it again and retry"
    )


def stage(session: AsyncSession, payload: WireModel, subject: str) -> None:
    """Stage one intent in the caller's transaction."""
    nats_subject, envelope = envelope_for(
        payload, source=SOURCE, subject=subject, correlation_id=correlation_id.get()
    )
    outbox.add(session, nats_subject, envelope)


def stage_apply(session: AsyncSession, row: BackupPolicy) -> None:
    stage(
        session,
        ApplyBackupPolicy(
            policy_id=row.id,
            name=row.name,
            generation=row.generation,
            spec=BackupPolicySpec.model_validate(row.spec),
        ),
        row.id,
    )


async def _check_references(
    session: AsyncSession, spec: BackupPolicySpec, previous: BackupPolicySpec | None
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
        and await repository.location_exists(session, spec.location_id)
    ):
        errors.append(
            FieldError(
                field="spec.locationId",
                message=f"backup location {spec.location_id!r} does not exist",
            )
        )
    known = set(previous.targets.cluster_ids) if previous else set()
    new = [c for c in spec.targets.cluster_ids if c not in known]
    live = await repository.live_cluster_ids(session, [c for c in new if ID_PATTERN.match(c)])
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


async def _commit(session: AsyncSession, name: str) -> None:
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise Conflict(
            f"a backup policy named {name!r} already exists, or its location was just deleted"
        ) from None


async def _require(
    session: AsyncSession, policy_id: str, *, for_update: bool = False
) -> BackupPolicy:
    row = await repository.get(session, policy_id, for_update=for_update)
    if row is None:
        raise NotFound(f"backup policy {policy_id!r} does not exist")
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


async def create(
    session: AsyncSession, body: BackupPolicyCreate, notify: Notify
) -> BackupPolicyRead:
    if await repository.get_by_name(session, body.name) is not None:
        raise Conflict(f"a backup policy named {body.name!r} already exists")
    await _check_references(session, body.spec, None)
    row = _new_row(body.name, body.labels, body.spec)
    repository.add(session, row)
    stage_apply(session, row)
    await _commit(session, body.name)
    notify()
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


async def add_default_if_none(session: AsyncSession, location_id: str) -> BackupPolicy | None:
    """In the caller's transaction: the `default` policy on `location_id` if no policy exists.

    The caller adds the location row first (the policy refers to it) and commits both."""
    if await repository.count(session) > 0:
        return None
    row = _new_row(DEFAULT_POLICY_NAME, {}, default_spec(location_id))
    repository.add(session, row)
    stage_apply(session, row)
    log.info("default backup policy created", extra={"policyId": row.id})
    return row


async def names_using_location(session: AsyncSession, location_id: str) -> list[str]:
    return await repository.names_using_location(session, location_id)


async def get(session: AsyncSession, policy_id: str) -> BackupPolicyRead:
    return to_read(await _require(session, policy_id))


async def list_policies(
    session: AsyncSession, *, limit: int, cursor: str | None
) -> Page[BackupPolicyRead]:
    after = None
    if cursor:
        position = Cursor.decode(cursor)
        after = (position.created_at, position.id)
    rows = await repository.list_page(session, limit=limit, after=after)
    following = None
    if len(rows) > limit:
        last = rows[limit - 1]
        following = Cursor(created_at=last.created_at, id=last.id).encode()
    return Page[BackupPolicyRead](items=[to_read(r) for r in rows[:limit]], next=following)


async def patch(
    session: AsyncSession,
    policy_id: str,
    body: BackupPolicyPatch,
    notify: Notify,
    if_match: str | None = None,
) -> BackupPolicyRead:
    row = await _require(session, policy_id, for_update=True)
    _check_precondition(row, if_match)
    if body.name is not None and body.name != row.name:
        raise InvalidInput(
            "name cannot be changed",
            errors=[FieldError(field="name", message="cannot be changed after creation")],
        )
    changed = False
    if body.labels is not None:
        labels = merge_patch(dict(row.labels), body.labels)
        try:
            validate_labels(labels)
        except ValueError as exc:
            raise InvalidInput(
                f"invalid input: labels: {exc}",
                errors=[FieldError(field="labels", message=str(exc))],
            ) from None
        if labels != row.labels:
            row.labels = labels
            changed = True
    if body.spec is not None:
        current = BackupPolicySpec.model_validate(row.spec)
        merged: dict[str, Any] = merge_patch(dict(row.spec), body.spec)
        try:
            spec = BackupPolicySpec.model_validate(merged)
        except ValidationError as exc:
            raise invalid_from_validation(exc, prefix=("spec",)) from None
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
    await _commit(session, row.name)
    notify()
    log.info("backup policy changed", extra={"policyId": row.id, "policy": row.name})
    return to_read(row)


async def delete(
    session: AsyncSession, policy_id: str, notify: Notify, if_match: str | None = None
) -> None:
    """Forget the policy (its backups stay in the store) and tell the backup service."""
    row = await _require(session, policy_id, for_update=True)
    _check_precondition(row, if_match)
    stage(session, DeleteBackupPolicy(policy_id=row.id, generation=row.generation), row.id)
    await repository.remove(session, row.id)
    await session.commit()
    notify()
    log.info("backup policy deleted", extra={"policyId": row.id, "policy": row.name})
