"""The backup service SIGKILLed in the middle of an upload: nothing is listed as complete, the
next run removes what was half written and succeeds."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

from libs.common.bus import Bus
from libs.common.contract.backup import RunBackup
from services.backup.stores import artifacts
from services.backup.stores.s3 import S3Store
from tests.integration.backup.conftest import s3_config
from tests.integration.backup.test_service import clean_buckets
from tests.support.parts import free_port
from tests.support.processes import kill_group, nest_process, wait_http
from tests.support.s3 import SeaweedS3

__all__ = ["clean_buckets"]


def big_foundry_db(path: Path, mib: int) -> None:
    """A SQLite database of about `mib` MiB of incompressible rows."""
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE blobs (id INTEGER PRIMARY KEY, data BLOB)")
    connection.executemany(
        "INSERT INTO blobs (data) VALUES (?)", ((os.urandom(1 << 20),) for _ in range(mib))
    )
    connection.commit()
    connection.close()


async def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if await asyncio.to_thread(check):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout} s")


async def test_sigkilled_mid_upload_leaves_nothing_listed_and_the_next_run_cleans_up(
    clean_buckets: Bus, s3_server: SeaweedS3, nats_url: str, tmp_path: Path
) -> None:
    bus = clean_buckets
    bucket = s3_server.new_bucket()
    database = tmp_path / "nest.db"
    big_foundry_db(database, 160)
    health = free_port()
    env: dict[str, str | None] = {
        "NEST_NATS_URL": nats_url,
        "NEST_DATA_DIR": str(tmp_path / "data"),
        "NEST_DATABASE_URL": f"sqlite:///{database}",
        "NEST_HEALTH_PORT": str(health),
        "NEST_BACKUP_S3_ENDPOINT": s3_server.endpoint,
        "NEST_BACKUP_S3_BUCKET": bucket,
        "NEST_BACKUP_S3_PREFIX": "nest",
        "NEST_BACKUP_S3_ACCESS_KEY_ID": s3_server.access_key,
        "NEST_BACKUP_S3_SECRET_ACCESS_KEY": s3_server.secret_key,
        # Anything without a manifest older than ~1 s counts as abandoned.
        "NEST_BACKUP_INCOMPLETE_GRACE_HOURS": "0.0003",
        "NEST_BACKUP_SERVE_PORT": str(free_port()),
    }
    completed: list[dict[str, Any]] = []

    async def collect(msg: Any) -> None:
        completed.append(json.loads(msg.data))

    subscription = await bus.nc.subscribe("nest.event.backup.completed", cb=collect)
    store = S3Store(s3_config(s3_server, bucket, prefix="nest"))
    first = nest_process(["run", "backup"], env, tmp_path / "first.log")
    try:
        wait_http(f"http://127.0.0.1:{health}/readyz", timeout=30)
        await bus.publish(RunBackup(target="foundry", kind="foundry"), source="test")
        await wait_until(
            lambda: bool(s3_server.multipart_uploads(bucket)), 60, "a multipart upload"
        )
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
    finally:
        kill_group(first)
    try:
        assert completed == []
        assert await artifacts.list_backups(store) == []
        assert s3_server.multipart_uploads(bucket), "the kill should leave an unfinished upload"

        await asyncio.sleep(1.5)  # past the grace period
        second = nest_process(["run", "backup"], env, tmp_path / "second.log")
        try:
            wait_http(f"http://127.0.0.1:{health}/readyz", timeout=30)
            await bus.publish(RunBackup(target="foundry", kind="foundry"), source="test")
            for _ in range(1200):
                if completed:
                    break
                await asyncio.sleep(0.05)
            assert completed, (tmp_path / "second.log").read_text()[-3000:]
        finally:
            kill_group(second, signal.SIGTERM)
        listed = await artifacts.list_backups(store)
        assert [str(m.ref) for m in listed] == [completed[0]["data"]["backup"]]
        assert listed[0].verified_at is not None
        # Nothing of the killed run is left: no unfinished upload, no folder but the backup's.
        assert s3_server.multipart_uploads(bucket) == []
        prefix = f"nest/{completed[0]['data']['backup']}/"
        assert all(key.startswith(prefix) for key in s3_server.keys(bucket)), s3_server.keys(bucket)
    finally:
        await subscription.unsubscribe()
        await store.close()
