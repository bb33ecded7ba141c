"""Backup and drill schedules in the `nest_backup_schedules` JetStream key-value bucket.

One `ScheduleRecord` per schedule: cron, kind, cluster, and the firing time of the last run.
Updates use the entry's revision, so two replicas never both advance the same schedule. A
policy's records are keyed `<purpose>.<policy id>.<target>`; the settings-based Foundry DB
schedule keeps the key `foundry` (`schedules.scheduler` keeps both in step with the catalog).
"""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Literal

import nats.js.errors
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue
from pydantic import ValidationError

from libs.common.bus import Bus
from libs.common.contract.backup import BackupKind
from libs.common.contract.base import WireModel
from libs.common.kv import bucket_keys, open_bucket

SCHEDULES_BUCKET = "nest_backup_schedules"


class ScheduleRecord(WireModel):
    """A backup schedule of one target."""

    target: str
    kind: BackupKind
    cron: str
    cluster_id: str | None = None
    kubernetes_version: str | None = None
    last_run: datetime | None = None
    """The firing time the last emitted run stood for; None: not run yet."""
    key: str | None = None
    """The KV key; None: `target` (schedules not from a policy)."""
    policy_id: str | None = None
    """The policy this schedule belongs to; None: from settings or written by hand."""
    purpose: Literal["backup", "drill"] = "backup"

    @property
    def record_key(self) -> str:
        return self.key or self.target


class Schedules:
    """Schedule records by target, with compare-and-set updates."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, bus: Bus) -> Schedules:
        return cls(await open_bucket(bus, KeyValueConfig(bucket=SCHEDULES_BUCKET, history=1)))

    async def all(self) -> list[tuple[ScheduleRecord, int]]:
        """Every valid record with its revision (malformed entries are skipped)."""
        keys = await bucket_keys(self.kv)
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
                await self.kv.create(record.record_key, data)
            else:
                await self.kv.update(record.record_key, data, last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        return True

    async def delete(self, target: str) -> None:
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            await self.kv.delete(target)
