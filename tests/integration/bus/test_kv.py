"""Key-value bookkeeping: listing a bucket's keys is complete, even while the client is busy;
leases let one replica at a time do periodic work."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable

import nats.js.errors
import pytest
from nats.js.api import KeyValueConfig

from libs.common.bus import Bus
from libs.common.kv import bucket_keys, leases_bucket, open_bucket, open_leases, run_while_held


async def test_bucket_keys_lists_every_key_and_the_deleted_ones_get_tells_apart(bus: Bus) -> None:
    name = f"test_keys_{uuid.uuid4().hex[:8]}"
    kv = await open_bucket(bus, KeyValueConfig(bucket=name, history=1))
    try:
        assert await bucket_keys(kv) == []
        keys = [f"k{i:03}" for i in range(150)]
        await asyncio.gather(*(kv.put(key, b"v") for key in keys))
        await kv.put("k000", b"again")  # one key, two revisions: listed once
        await kv.delete("k001")

        async def busy() -> None:
            # Keep this process's event loop busy, as a loaded service is, while listing.
            for _ in range(200):
                await kv.put("k002", b"x")

        listings = await asyncio.gather(busy(), *(bucket_keys(kv) for _ in range(10)))
        for listing in listings[1:]:
            assert listing == sorted(keys)
        with pytest.raises((nats.js.errors.KeyDeletedError, nats.js.errors.KeyNotFoundError)):
            await kv.get("k001")
    finally:
        await bus.nc.jetstream().delete_key_value(name)


async def test_one_of_two_replicas_works_under_the_lease_and_hands_it_over_on_stop(
    bus: Bus,
) -> None:
    service = f"test{uuid.uuid4().hex[:6]}"
    leases = await open_leases(bus, service, ttl_seconds=30)
    rounds: dict[str, int] = {"a": 0, "b": 0}

    def work(holder: str) -> Callable[[], Awaitable[None]]:
        async def one_round() -> None:
            rounds[holder] += 1

        return one_round

    a = asyncio.create_task(run_while_held(leases, "resync", "a", work("a"), interval=0.05))
    await asyncio.sleep(0.3)
    b = asyncio.create_task(run_while_held(leases, "resync", "b", work("b"), interval=0.05))
    try:
        await asyncio.sleep(0.5)
        assert rounds["a"] > 3
        assert rounds["b"] == 0  # the lease is a's, renewed every round
        a.cancel()  # a stops: it gives the lease up, b takes over long before the TTL
        with contextlib.suppress(asyncio.CancelledError):
            await a
        for _ in range(100):
            if rounds["b"]:
                break
            await asyncio.sleep(0.05)
        assert rounds["b"] > 0
    finally:
        b.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await b
        await bus.nc.jetstream().delete_key_value(leases_bucket(service))


async def test_a_failing_round_does_not_end_the_loop(bus: Bus) -> None:
    service = f"test{uuid.uuid4().hex[:6]}"
    leases = await open_leases(bus, service, ttl_seconds=30)
    calls: list[int] = []

    async def fails_first() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the management cluster does not answer")

    loop = asyncio.create_task(run_while_held(leases, "tick", "a", fails_first, interval=0.05))
    try:
        for _ in range(100):
            if len(calls) >= 3:
                break
            await asyncio.sleep(0.05)
        assert len(calls) >= 3
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
        await bus.nc.jetstream().delete_key_value(leases_bucket(service))
