"""Backup locations: stored only after a live probe; the secret access key kept sealed."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from libs.common.bus import Bus
from libs.common.contract import envelope_for
from libs.common.contract.backup_location import BackupLocationSpec
from libs.common.contract.backup_policy import (
    ApplyBackupLocation,
    DeleteBackupLocation,
    SealedBackupLocation,
    SealedLocationSpec,
)
from libs.common.contract.cluster import validate_labels
from libs.common.logging import correlation_id
from libs.common.secrets import Sealer
from services.api.backup_locations import probe, repository
from services.api.backup_locations.schemas import (
    BackupLocationCreate,
    BackupLocationPatch,
    BackupLocationRead,
    BackupLocationSpecRead,
)
from services.api.backup_policies import service as policies
from services.api.merge_patch import merge_patch
from services.api.models import BackupLocation, utcnow
from services.api.outbox import repository as outbox
from services.api.pagination import Cursor, Page
from services.api.problems import Conflict, FieldError, InvalidInput, NotFound
from services.api.problems import invalid_from_validation as _invalid

log = logging.getLogger(__name__)

SECRET_FIELD = "secretAccessKey"


def _context(location_id: str) -> str:
    return f"backup-location:{location_id}"


def _stored_spec(spec: BackupLocationSpec) -> dict[str, Any]:
    return spec.model_dump(
        mode="json", by_alias=True, exclude={"secret_access_key"}, exclude_none=True
    )


def to_read(row: BackupLocation) -> BackupLocationRead:
    return BackupLocationRead(
        id=row.id,
        name=row.name,
        labels=dict(row.labels),
        spec=BackupLocationSpecRead.model_validate(row.spec),
        generation=row.generation,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def full_spec(row: BackupLocation, sealer: Sealer) -> BackupLocationSpec:
    """The spec with its secret opened: for the probe and for the backup service only."""
    spec = dict(row.spec)
    if row.sealed_secret is not None:
        spec[SECRET_FIELD] = sealer.open(row.sealed_secret, context=_context(row.id))
    return BackupLocationSpec.model_validate(spec)


def _stage(session: AsyncSession, payload: ApplyBackupLocation | DeleteBackupLocation) -> None:
    subject, envelope = envelope_for(
        payload, source="api", subject=payload.location_id, correlation_id=correlation_id.get()
    )
    outbox.add(session, subject, envelope)


def stage_apply(session: AsyncSession, row: BackupLocation) -> None:
    """Stage the location for the backup service: the spec without the secret, which travels
    sealed exactly as stored (never in clear on the bus)."""
    _stage(
        session,
        ApplyBackupLocation(
            location_id=row.id,
            name=row.name,
            generation=row.generation,
            location=SealedBackupLocation(
                spec=SealedLocationSpec.model_validate(row.spec),
                sealed_secret_access_key=row.sealed_secret,
            ),
        ),
    )


async def _commit(session: AsyncSession, name: str) -> None:
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise Conflict(f"a backup location named {name!r} already exists") from None


async def _require(session: AsyncSession, location_id: str) -> BackupLocation:
    row = await repository.get(session, location_id)
    if row is None:
        raise NotFound(f"backup location {location_id!r} does not exist")
    return row


async def exists(session: AsyncSession, location_id: str) -> bool:
    return await repository.get(session, location_id) is not None


async def create(
    session: AsyncSession, bus: Bus, sealer: Sealer, body: BackupLocationCreate
) -> BackupLocationRead:
    if await repository.get_by_name(session, body.name) is not None:
        raise Conflict(f"a backup location named {body.name!r} already exists")
    await probe.probe(bus, body.spec)
    location_id = str(uuid.uuid4())
    secret = body.spec.secret_access_key
    sealed = sealer.seal(secret, context=_context(location_id)) if secret else None

    def stage() -> BackupLocation:
        now = utcnow()
        row = BackupLocation(
            id=location_id,
            name=body.name,
            labels=dict(body.labels),
            kind=body.spec.kind,
            spec=_stored_spec(body.spec),
            sealed_secret=sealed,
            generation=1,
            created_at=now,
            updated_at=now,
        )
        repository.add(session, row)
        stage_apply(session, row)
        return row

    row = stage()
    default = await policies.add_default_if_none(session, location_id)
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        if default is None:
            raise Conflict(f"a backup location named {body.name!r} already exists") from None
        # Another location created at the same instant brought the `default` policy first
        # (its name is unique): keep that one, store this location without it.
        row = stage()
        await _commit(session, body.name)
    log.info("backup location created", extra={"locationId": row.id, "location": row.name})
    return to_read(row)


async def get(session: AsyncSession, location_id: str) -> BackupLocationRead:
    return to_read(await _require(session, location_id))


async def list_locations(
    session: AsyncSession, *, limit: int, cursor: str | None
) -> Page[BackupLocationRead]:
    after = None
    if cursor:
        position = Cursor.decode(cursor)
        after = (position.created_at, position.id)
    rows = await repository.list_page(session, limit=limit, after=after)
    following = None
    if len(rows) > limit:
        last = rows[limit - 1]
        following = Cursor(created_at=last.created_at, id=last.id).encode()
    return Page[BackupLocationRead](items=[to_read(r) for r in rows[:limit]], next=following)


async def patch(
    session: AsyncSession, bus: Bus, sealer: Sealer, location_id: str, body: BackupLocationPatch
) -> BackupLocationRead:
    row = await _require(session, location_id)
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
        current = full_spec(row, sealer)
        try:
            spec = BackupLocationSpec.model_validate(
                merge_patch(current.model_dump(mode="json", by_alias=True), body.spec)
            )
        except ValidationError as exc:
            raise _invalid(exc, prefix=("spec",)) from None
        if spec != current:
            await probe.probe(bus, spec)
            secret = spec.secret_access_key
            row.kind = spec.kind
            row.spec = _stored_spec(spec)
            row.sealed_secret = sealer.seal(secret, context=_context(row.id)) if secret else None
            row.generation += 1
            stage_apply(session, row)
            changed = True
    if changed:
        row.updated_at = utcnow()
        await session.commit()
        log.info("backup location changed", extra={"locationId": row.id, "location": row.name})
    return to_read(row)


async def delete(session: AsyncSession, location_id: str) -> None:
    row = await _require(session, location_id)
    users = await policies.names_using_location(session, location_id)
    if users:
        raise Conflict(
            f"backup location {row.name!r} is used by backup "
            f"{'policy' if len(users) == 1 else 'policies'} {', '.join(map(repr, users))}; "
            "point them elsewhere or delete them first"
        )
    _stage(session, DeleteBackupLocation(location_id=row.id, generation=row.generation))
    await repository.remove(session, location_id)
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise Conflict(f"backup location {row.name!r} was just given to a backup policy") from None
