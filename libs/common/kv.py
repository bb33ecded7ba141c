"""JetStream key-value buckets for services' small bookkeeping, and leases built on them.

A lease makes work that must happen once (schedules, resyncs) safe with several replicas: the
holder renews it by compare-and-set, and the bucket's TTL expires it when the holder dies. Each
service keeps its leases in its own bucket, `nest_<service>_leases` (`open_leases`), and runs
such work with `run_while_held`: take or renew the lease, work if it is ours, sleep, again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from libs.common.bus import Bus

log = logging.getLogger(__name__)


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


def leases_bucket(service: str) -> str:
    """The bucket holding `service`'s leases."""
    return f"nest_{service}_leases"


async def open_leases(bus: Bus, service: str, ttl_seconds: float) -> Leases:
    """`service`'s leases (bucket `nest_<service>_leases`), each lasting `ttl_seconds` unless
    renewed."""
    return await Leases.open(bus, leases_bucket(service), ttl_seconds)


async def run_while_held(
    leases: Leases,
    lease: str,
    holder: str,
    work: Callable[[], Awaitable[object]],
    *,
    interval: float,
    first_after: float = 0.0,
) -> None:
    """Every `interval` seconds (the first time after `first_after`), take or renew `lease` for
    `holder` and run `work` while it is ours. A failing round is logged and the next one runs
    as usual; on cancellation the lease is given up, so another replica takes over at once."""
    try:
        await asyncio.sleep(first_after)
        while True:
            try:
                if await leases.hold(lease, holder):
                    await work()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s failed; trying again in %.0fs", lease, interval)
            await asyncio.sleep(interval)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(leases.release(lease, holder), 2.0)
