"""The backup service's small bookkeeping in JetStream key-value buckets: schedules and leases.

- `nest_backup_schedules`: one entry per target (`ScheduleRecord`: cron, kind, cluster, and the
  firing time of the last run). The API will write cluster schedules here; the Foundry DB
  schedule comes from settings. Updates use the entry's revision, so two replicas never both
  advance the same schedule.
- `nest_backup_leases`: named leases with a TTL; the replica holding `scheduler` emits the
  scheduled runs.
"""

from __future__ import annotations

import contextlib
from datetime import datetime

import nats.js.errors
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue
from pydantic import ValidationError

from libs.common.bus import Bus
from libs.common.contract.backup import BackupKind
from libs.common.contract.base import WireModel
from libs.common.kv import Leases, open_bucket

SCHEDULES_BUCKET = "nest_backup_schedules"
LEASES_BUCKET = "nest_backup_leases"


class ScheduleRecord(WireModel):
    """A backup schedule of one target."""

    target: str
    kind: BackupKind
    cron: str
    cluster_id: str | None = None
    kubernetes_version: str | None = None
    last_run: datetime | None = None
    """The firing time the last emitted run stood for; None: not run yet."""


class Schedules:
    """Schedule records by target, with compare-and-set updates."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, bus: Bus) -> Schedules:
        return cls(await open_bucket(bus, KeyValueConfig(bucket=SCHEDULES_BUCKET, history=1)))

    async def all(self) -> list[tuple[ScheduleRecord, int]]:
        """Every valid record with its revision (malformed entries are skipped)."""
        try:
            keys = await self.kv.keys()
        except nats.js.errors.NoKeysError:
            return []
        found: list[tuple[ScheduleRecord, int]] = []
        for key in keys:
            entry = await self.get(key)
            if entry is not None:
                found.append(entry)
        return found

    async def get(self, target: str) -> tuple[ScheduleRecord, int] | None:
        try:
            entry = await self.kv.get(target)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        if entry.value is None or entry.revision is None:
            return None
        try:
            return ScheduleRecord.model_validate_json(entry.value), entry.revision
        except ValidationError:
            return None

    async def put(self, record: ScheduleRecord, revision: int | None) -> bool:
        """Create (revision None) or update at `revision`; False if someone changed it first."""
        data = record.model_dump_json(by_alias=True).encode()
        try:
            if revision is None:
                await self.kv.create(record.target, data)
            else:
                await self.kv.update(record.target, data, last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        return True

    async def delete(self, target: str) -> None:
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            await self.kv.delete(target)


async def open_leases(bus: Bus, ttl_seconds: float) -> Leases:
    """This service's leases (bucket `LEASES_BUCKET`)."""
    return await Leases.open(bus, LEASES_BUCKET, ttl_seconds)
