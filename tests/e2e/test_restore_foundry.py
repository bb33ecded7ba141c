"""A lost appliance, end to end with real processes: `nest up`, a cluster and a viewer token, a
Foundry DB backup through the API, the appliance wiped (only the backups and NEST_SECRETS_KEY
kept), `nest restore foundry`, `nest up` again: the cluster and the token are back and the token
authenticates. On SQLite and PostgreSQL, plain and encrypted."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from services.backup.stores import crypto
from tests.conftest import PG_DSN, run_sync
from tests.support.parts import free_port, missing
from tests.support.processes import AUTH, kill_group, nest_process, wait_http

pytestmark = pytest.mark.e2e

SECRETS_KEY = "e2e-restore-secrets-key-0123456789abcdef"


async def _admin(sql: str) -> None:
    connection = await asyncpg.connect(PG_DSN, timeout=5)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test (dropped afterwards)."""
    for tool in ("pg_dump", "pg_restore"):
        if shutil.which(tool) is None:
            missing(f"{tool} not found (apt-get install postgresql-client)")
    name = f"nest_e2e_{uuid.uuid4().hex[:12]}"
    try:
        run_sync(_admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError) as exc:
        missing(f"PostgreSQL is not reachable at {PG_DSN}: {exc}")
    yield f"{PG_DSN.rsplit('/', 1)[0]}/{name}"
    run_sync(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def restore_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "restore", "foundry", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def start(env: dict[str, str | None], log: Path, base: str) -> subprocess.Popen[bytes]:
    up = nest_process(["up"], env, log)
    try:
        wait_http(f"{base}/readyz", timeout=90, process=up)
    except BaseException:
        kill_group(up)
        raise
    return up


def stop(up: subprocess.Popen[bytes]) -> None:
    up.send_signal(signal.SIGINT)
    try:
        assert up.wait(60) == 0
    finally:
        kill_group(up)


async def wait_completed(client: httpx.AsyncClient, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    items: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        response = await client.get("/api/v1/backups", params={"target": "foundry"})
        assert response.status_code == 200, response.text
        items = response.json()["items"]
        done = [item for item in items if item["state"] in ("Completed", "Failed")]
        if done:
            assert done[0]["state"] == "Completed", done[0]
            return done[0]
        await asyncio.sleep(0.25)
    raise AssertionError(f"no completed Foundry backup within {timeout}s: {items}")


@pytest.mark.parametrize(
    ("engine", "encrypted"),
    [("sqlite", False), ("sqlite", True), ("postgres", True)],
    ids=["sqlite-plain", "sqlite-encrypted", "postgres-encrypted"],
)
async def test_lost_appliance_comes_back_from_its_foundry_backup(
    tmp_path: Path, request: pytest.FixtureRequest, engine: str, encrypted: bool
) -> None:
    os.environ.pop("NEST_NATS_URL", None)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    data = tmp_path / "data"
    backups = tmp_path / "backups"
    env: dict[str, str | None] = {
        "NEST_DATA_DIR": str(data),
        "NEST_API_PORT": str(port),
        "NEST_BACKUP_DIR": str(backups),
        "NEST_SECRETS_KEY": SECRETS_KEY,
        "NEST_BACKUP_SERVE_PORT": "0",
        "NEST_DATABASE_URL": None,
        "NEST_BACKUP_ENCRYPTION_KEYS": None,
        "NEST_BACKUP_ENCRYPTION_ACTIVE_KEY": None,
    }
    if engine == "postgres":
        env["NEST_DATABASE_URL"] = request.getfixturevalue("postgres_url")
    if encrypted:
        env["NEST_BACKUP_ENCRYPTION_KEYS"] = json.dumps({"e2e-1": crypto.generate_key()})
    cli_env = {
        k: v for k, v in {**os.environ, **env}.items() if v is not None and k != "NEST_NATS_URL"
    }
    cli_env["COLUMNS"] = "160"  # output is not a terminal: give the table room

    up = start(env, tmp_path / "up-1.log", base)
    try:
        async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=30) as client:
            cluster = await client.post("/api/v1/clusters", json={"name": "kept"})
            assert cluster.status_code == 201, cluster.text
            token = await client.post(
                "/api/v1/tokens", json={"name": "reader", "spec": {"scope": "viewer"}}
            )
            assert token.status_code == 201, token.text
            viewer = token.json()["token"]
            requested = await client.post("/api/v1/backups", json={"target": "foundry"})
            assert requested.status_code == 202, requested.text
            backup = await wait_completed(client)
            assert backup["encrypted"] is encrypted and backup["verified"] is True
    finally:
        stop(up)

    # The appliance is lost: its data dir (and database) go; the backups and the secrets key stay.
    shutil.rmtree(data)
    if engine == "postgres":
        name = str(env["NEST_DATABASE_URL"]).rsplit("/", 1)[1]
        run_sync(_admin(f'DROP DATABASE "{name}" WITH (FORCE)'))
        run_sync(_admin(f'CREATE DATABASE "{name}"'))

    listed = restore_cli(cli_env, "--location", str(backups), "--list")
    assert listed.returncode == 0, listed.stderr
    assert backup["id"] in listed.stdout and "← default" in listed.stdout
    assert ("encrypted (e2e-1)" in listed.stdout) is encrypted

    restored = restore_cli(cli_env, "--location", str(backups))
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert "Foundry DB restored" in restored.stdout and backup["id"] in restored.stdout
    # Once restored, the database holds clusters and tokens: a second run refuses.
    again = restore_cli(cli_env, "--location", str(backups), "--backup", backup["id"])
    assert again.returncode == 1
    assert "already holds data" in again.stderr and "--force" in again.stderr

    up = start(env, tmp_path / "up-2.log", base)
    try:
        viewer_auth = {"Authorization": f"Bearer {viewer}"}
        async with httpx.AsyncClient(base_url=base, headers=viewer_auth, timeout=30) as client:
            listing = await client.get("/api/v1/clusters")
            assert listing.status_code == 200, listing.text
            assert [item["name"] for item in listing.json()["items"]] == ["kept"]
            kept = await client.get(f"/api/v1/clusters/{cluster.json()['id']}")
            assert kept.status_code == 200
        async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=30) as client:
            tokens = (await client.get("/api/v1/tokens")).json()["items"]
            assert "reader" in [item["name"] for item in tokens]
            # The backup restored from was mid-run in its own dump; the restore records it done.
            shown = (await client.get(f"/api/v1/backups/{backup['id']}")).json()
            assert shown["state"] == "Completed", shown
            assert shown["storedSha256"] == backup["storedSha256"]
        # Never while Nest runs, even forced.
        running = restore_cli(cli_env, "--location", str(backups), "--force")
        assert running.returncode == 1
        assert "Nest is running" in running.stderr
    finally:
        stop(up)
