"""Key-value bookkeeping: listing a bucket's keys is complete, even while the client is busy."""

from __future__ import annotations

import asyncio
import uuid

import nats.js.errors
import pytest
from nats.js.api import KeyValueConfig

from libs.common.bus import Bus
from libs.common.kv import bucket_keys, open_bucket


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
