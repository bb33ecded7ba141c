"""Recovery points in the `nest_backup_rpo` JetStream key-value bucket.

One `RpoRecord` per policy and target (`<policy id>.<target>`): when the target was first seen,
its last successful backup, and the RPO period last reported as missed, so `RpoMissed` is
published once per period. Updates use the entry's revision (compare-and-set).
"""

from __future__ import annotations

import contextlib
from datetime import datetime

import nats.js.errors
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue
from pydantic import ValidationError

from libs.common.bus import Bus
from libs.common.contract.base import WireModel
from libs.common.kv import bucket_keys, open_bucket

RPO_BUCKET = "nest_backup_rpo"


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
