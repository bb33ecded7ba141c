"""JetStream key-value buckets for services' small bookkeeping, and leases built on them.

A lease makes work that must happen once (schedules, resyncs) safe with several replicas: the
holder renews it by compare-and-set, and the bucket's TTL expires it when the holder dies.
"""

from __future__ import annotations

import contextlib

import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from libs.common.bus import Bus


async def open_bucket(bus: Bus, config: KeyValueConfig) -> KeyValue:
    """The bucket named in `config`, created (file storage) if it does not exist yet."""
    js = bus.nc.jetstream()
    config.storage = StorageType.FILE
    try:
        return await js.key_value(str(config.bucket))
    except nats.js.errors.BucketNotFoundError:
        pass
    try:
        return await js.create_key_value(config)
    except nats.js.errors.BadRequestError:
        # Another replica created it between our two calls.
        return await js.key_value(str(config.bucket))


async def bucket_keys(kv: KeyValue) -> list[str]:
    """Every key that has an entry in the bucket, deleted ones included (their entry is the
    delete marker: `get` tells them apart), sorted.

    Not `KeyValue.keys()`: nats-py lists keys with a watcher that ends as soon as the server says
    nothing is pending, which it already says while the delivered entries are still unread in
    this process's socket, so under load `keys()` answers "no keys" for a full bucket. The
    stream's per-subject state is one authoritative answer from the server.
    """
    prefix = f"$KV.{kv._name}."
    info = await kv._js.stream_info(kv._stream, subjects_filter=f"{prefix}>")
    subjects = info.state.subjects or {}
    return sorted(subject[len(prefix) :] for subject in subjects)


class Leases:
    """Named leases in one bucket whose TTL is the lease time."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, bus: Bus, bucket: str, ttl_seconds: float) -> Leases:
        config = KeyValueConfig(bucket=bucket, history=1, ttl=ttl_seconds)
        return cls(await open_bucket(bus, config))

    async def hold(self, name: str, holder: str) -> bool:
        """Take the lease `name`, or renew it if `holder` has it; False while someone else does."""
        try:
            await self.kv.create(name, holder.encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            pass
        else:
            return True
        try:
            entry = await self.kv.get(name)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return False  # expired or released between the two calls; the next round takes it
        if entry.value is None or entry.value.decode() != holder or entry.revision is None:
            return False
        try:
            await self.kv.update(name, holder.encode(), last=entry.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        return True

    async def release(self, name: str, holder: str) -> None:
        """Give the lease up early (only if `holder` still has it)."""
        with contextlib.suppress(nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            entry = await self.kv.get(name)
            if entry.value is not None and entry.value.decode() == holder:
                with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
                    await self.kv.delete(name, last=entry.revision)
