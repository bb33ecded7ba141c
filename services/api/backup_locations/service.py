"""Backup locations: stored only after a live probe; the secret access key kept sealed."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from libs.common.bus import Bus
from libs.common.contract.backup_location import BackupLocationSpec
from libs.common.contract.backup_policy import (
    ApplyBackupLocation,
    DeleteBackupLocation,
    SealedBackupLocation,
    SealedLocationSpec,
)
from libs.common.secrets import Sealer
from services.api.backup_locations import probe, repository
from services.api.backup_locations.schemas import (
    BackupLocationCreate,
    BackupLocationPatch,
    BackupLocationRead,
    BackupLocationSpecRead,
)
from services.api.backup_policies import service as policies
from services.api.kit import outbox, paging
from services.api.kit.db import Session
from services.api.kit.paging import Page
from services.api.kit.patch import check_name_unchanged, patched_labels, patched_spec
from services.api.kit.problems import Conflict, NotFound
from services.api.models import BackupLocation, utcnow

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


def _stage(session: Session, payload: ApplyBackupLocation | DeleteBackupLocation) -> None:
    outbox.stage(session, payload, subject=payload.location_id)


def stage_apply(session: Session, row: BackupLocation) -> None:
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


async def _flush(session: AsyncSession, name: str) -> None:
    try:
        await session.flush()
    except IntegrityError:
        raise Conflict(f"a backup location named {name!r} already exists") from None


async def _require(session: Session, location_id: str) -> BackupLocation:
    orm = await session.orm()
    row = await repository.get(orm, location_id) or await repository.get_by_name(orm, location_id)
    if row is None:
        raise NotFound(
            f"backup location {location_id!r} does not exist (looked up by id, then by name)"
        )
    return row


async def create(
    session: Session, bus: Bus, sealer: Sealer, body: BackupLocationCreate
) -> BackupLocationRead:
    orm = await session.orm()
    if await repository.get_by_name(orm, body.name) is not None:
        raise Conflict(f"a backup location named {body.name!r} already exists")
    # The probe may take seconds: no connection is held meanwhile.
    await session.close()
    await probe.probe(bus, body.spec)
    orm = await session.orm()
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
        repository.add(orm, row)
        stage_apply(session, row)
        return row

    row = stage()
    await _flush(orm, body.name)
    default = await policies.add_default_if_none(session, location_id)
    if default is not None:
        try:
            await orm.flush()
        except IntegrityError:
            # Another location created at the same instant brought the `default` policy first
            # (its name is unique): keep that one, store this location without it.
            await session.rollback()
            orm = await session.orm()
            row = stage()
            await _flush(orm, body.name)
    log.info("backup location created", extra={"locationId": row.id, "location": row.name})
    return to_read(row)


async def get(session: Session, location_id: str) -> BackupLocationRead:
    return to_read(await _require(session, location_id))


async def list_locations(
    session: Session, *, limit: int, cursor: str | None
) -> Page[BackupLocationRead]:
    rows = await repository.list_page(await session.orm(), limit=limit, after=paging.after(cursor))
    return paging.page_of(rows, limit, to_read, paging.by_created)


async def patch(
    session: Session, bus: Bus, sealer: Sealer, location_id: str, body: BackupLocationPatch
) -> BackupLocationRead:
    row = await _require(session, location_id)
    check_name_unchanged(row.name, body.name)
    changed = False
    labels = patched_labels(dict(row.labels), body.labels)
    if labels is not None:
        row.labels = labels
        changed = True
    if body.spec is not None:
        current = full_spec(row, sealer)
        spec = patched_spec(
            BackupLocationSpec, current.model_dump(mode="json", by_alias=True), body.spec
        )
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
        await (await session.orm()).flush()
        log.info("backup location changed", extra={"locationId": row.id, "location": row.name})
    return to_read(row)


async def delete(session: Session, location_id: str) -> None:
    row = await _require(session, location_id)
    users = await policies.names_using_location(session, location_id)
    if users:
        raise Conflict(
            f"backup location {row.name!r} is used by backup "
            f"{'policy' if len(users) == 1 else 'policies'} {', '.join(map(repr, users))}; "
            "point them elsewhere or delete them first"
        )
    _stage(session, DeleteBackupLocation(location_id=row.id, generation=row.generation))
    try:
        await repository.remove(await session.orm(), row.id)
    except IntegrityError:
        raise Conflict(f"backup location {row.name!r} was just given to a backup policy") from None
