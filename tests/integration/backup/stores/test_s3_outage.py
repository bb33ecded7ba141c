"""S3 dies mid-upload: nothing is listed as complete, the next run cleans up and succeeds."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.backup import errors
from services.backup.stores import artifacts, crypto
from services.backup.stores.layout import new_ref
from services.backup.stores.s3 import S3Store
from services.backup.stores.streams import iterate
from tests.integration.backup.conftest import s3_config
from tests.support.s3 import SeaweedS3, seaweed


@pytest.fixture
def own_s3(tmp_path: Path) -> Iterator[SeaweedS3]:
    """A SeaweedFS of this test alone: it gets killed."""
    with seaweed(tmp_path / "seaweed") as server:
        yield server


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
async def test_server_killed_mid_upload(
    own_s3: SeaweedS3, keyring: crypto.Keyring, encrypted: bool
) -> None:
    bucket = own_s3.new_bucket()
    ring = keyring if encrypted else None
    store = S3Store(s3_config(own_s3, bucket))
    killed = asyncio.Event()

    async def source() -> AsyncIterator[bytes]:
        for index in range(40):
            if index == 14:  # two 5 MiB parts are on the server by now
                await asyncio.to_thread(own_s3.stop)
                killed.set()
            yield os.urandom(1 << 20)

    try:
        with pytest.raises(errors.StoreError):
            await artifacts.write_backup(
                store, new_ref("cluster-demo", datetime.now(UTC)), "etcd", source(), keyring=ring
            )
        assert killed.is_set()
    finally:
        await store.close()

    await asyncio.to_thread(own_s3.start)
    store = S3Store(s3_config(own_s3, bucket))
    try:
        assert await artifacts.list_backups(store) == []
        # The next run: cleanup (grace elapsed), then a backup that succeeds.
        later = datetime.now(UTC) + timedelta(hours=7)
        await artifacts.cleanup_incomplete(store, later)
        assert own_s3.keys(bucket) == []
        assert own_s3.multipart_uploads(bucket) == []
        data = os.urandom(11 << 20)
        manifest = await artifacts.write_backup(
            store, new_ref("cluster-demo", datetime.now(UTC)), "etcd", iterate(data), keyring=ring
        )
        assert [m.backup_id for m in await artifacts.list_backups(store)] == [manifest.backup_id]
    finally:
        await store.close()


async def test_incomplete_backup_in_progress_survives_cleanup(s3_store: S3Store) -> None:
    """An artifact without a manifest is invisible, and kept while within the grace period."""
    ref = new_ref("cluster-demo", datetime.now(UTC))
    await s3_store.put(ref.key("etcd-snapshot.db"), iterate(b"still uploading"))
    assert await artifacts.list_backups(s3_store) == []
    assert await artifacts.cleanup_incomplete(s3_store, datetime.now(UTC)) == []
    assert await s3_store.exists(ref.key("etcd-snapshot.db"))
    removed = await artifacts.cleanup_incomplete(s3_store, datetime.now(UTC) + timedelta(days=1))
    assert removed == [ref]
    assert await s3_store.list("") == []


async def test_download_resumes_after_the_server_comes_back(own_s3: SeaweedS3) -> None:
    """A restore of a large backup survives the store restarting mid-download."""
    bucket = own_s3.new_bucket()
    store = S3Store(s3_config(own_s3, bucket, resume_attempts=8))
    data = os.urandom(48 << 20)
    try:
        await store.put("t/x/big", iterate(data))
        received = bytearray()
        restarted: asyncio.Task[None] | None = None
        async for chunk in store.get("t/x/big"):
            received += chunk
            if restarted is None and len(received) >= 4 << 20:
                await asyncio.to_thread(own_s3.stop)
                restarted = asyncio.create_task(asyncio.to_thread(own_s3.start))
        assert restarted is not None
        await restarted
        assert bytes(received) == data
        assert store.resumed >= 1
    finally:
        await store.close()
