"""The backup service's small bookkeeping in JetStream key-value buckets: schedules and leases.

- `nest_backup_schedules`: one entry per target (`ScheduleRecord`: cron, kind, cluster, and the
  firing time of the last run). The API will write cluster schedules here; the Foundry DB
  schedule comes from settings. Updates use the entry's revision, so two replicas never both
  advance the same schedule.
- `nest_backup_leases`: named leases with a TTL; the replica holding `scheduler` emits the
  scheduled runs.
- `nest_backup_rpo`: per policy and target, when it was first seen, its last success and the
  RPO period last reported (`RpoRecord`).

A policy's records are keyed `<purpose>.<policy id>.<target>` (`ScheduleRecord.key`); the
settings-based Foundry schedule keeps the key `foundry`.
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
from libs.common.kv import Leases, bucket_keys, open_bucket

SCHEDULES_BUCKET = "nest_backup_schedules"
LEASES_BUCKET = "nest_backup_leases"
RPO_BUCKET = "nest_backup_rpo"


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


class RpoRecord(WireModel):
    """The recovery point of one policy's target."""

    policy_id: str
    target: str
    first_seen: datetime
    last_success: datetime | None = None
    reported_reference: datetime | None = None
    """The reference (last success, else first seen) the last RpoMissed was counted from."""
    reported_period: int = 0

    @property
    def key(self) -> str:
        return f"{self.policy_id}.{self.target}"

    @property
    def reference(self) -> datetime:
        return self.last_success or self.first_seen


class RpoBook:
    """RPO records by `<policy id>.<target>`, with compare-and-set updates."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, bus: Bus) -> RpoBook:
        return cls(await open_bucket(bus, KeyValueConfig(bucket=RPO_BUCKET, history=1)))

    async def get(self, key: str) -> tuple[RpoRecord, int] | None:
        try:
            entry = await self.kv.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        if entry.value is None or entry.revision is None:
            return None
        try:
            return RpoRecord.model_validate_json(entry.value), entry.revision
        except ValidationError:
            return None

    async def keys(self) -> list[str]:
        return await bucket_keys(self.kv)

    async def put(self, record: RpoRecord, revision: int | None) -> bool:
        data = record.model_dump_json(by_alias=True).encode()
        try:
            if revision is None:
                await self.kv.create(record.key, data)
            else:
                await self.kv.update(record.key, data, last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        return True

    async def delete(self, key: str) -> None:
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            await self.kv.delete(key)

    async def record_success(self, policy_id: str, target: str, when: datetime) -> None:
        """Move the target's last success forward to `when` (never backwards)."""
        key = f"{policy_id}.{target}"
        for _ in range(20):
            held = await self.get(key)
            if held is None:
                record = RpoRecord(
                    policy_id=policy_id, target=target, first_seen=when, last_success=when
                )
                if await self.put(record, None):
                    return
                continue
            record, revision = held
            if record.last_success is not None and record.last_success >= when:
                return
            record.last_success = when
            if await self.put(record, revision):
                return


async def open_leases(bus: Bus, ttl_seconds: float) -> Leases:
    """This service's leases (bucket `LEASES_BUCKET`)."""
    return await Leases.open(bus, LEASES_BUCKET, ttl_seconds)
