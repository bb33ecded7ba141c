"""`nest up` end to end: real processes, the embedded NATS, a stand-in provisioner, clean stops."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.parts import free_port
from tests.support.processes import (
    ADMIN_TOKEN,
    AUTH,
    descendants_alive,
    kill_group,
    nest_process,
    process_tree,
    wait_http,
)

pytestmark = pytest.mark.e2e


def wait_for_tree(pid: int, minimum: int, timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tree = process_tree(pid)
        if len(tree) >= minimum:
            return tree
        time.sleep(0.1)
    raise AssertionError(f"nest up has {process_tree(pid)} children, expected {minimum}")


async def test_nest_up_serves_the_flow_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    env = {"NEST_DATA_DIR": str(data), "NEST_API_PORT": str(port)}
    env_clean = {k: v for k, v in os.environ.items() if k != "NEST_NATS_URL"}
    os.environ.pop("NEST_NATS_URL", None)
    up = nest_process(["up"], env, tmp_path / "up.log")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/readyz", timeout=60, process=up)
        tree = wait_for_tree(up.pid, 4)  # nats-server, api, provisioner, backup
        assert (data / "nats" / "url").read_text().startswith("nats://127.0.0.1:")

        async with httpx.AsyncClient(base_url=base, headers=AUTH) as client:
            created = (await client.post("/api/v1/clusters", json={"name": "e2e"})).json()
            # The real provisioner takes the intent; with no management cluster configured it
            # reports that clearly instead of failing.
            condition: dict[str, str] = {}
            for _ in range(200):
                cluster = (await client.get(f"/api/v1/clusters/{created['id']}")).json()
                conditions = {c["type"]: c for c in cluster["status"]["conditions"]}
                condition = conditions.get("ManagementClusterAvailable", {})
                if condition:
                    break
                await asyncio.sleep(0.1)
            assert condition["status"] == "False", cluster
            assert "NEST_KUBECONFIG" in condition["message"]
            assert cluster["status"]["observedGeneration"] == 1

        listing = subprocess.run(
            [sys.executable, "-m", "cli.main", "clusters", "list"],
            env={**env_clean, **env, "NEST_TOKEN": ADMIN_TOKEN},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert "e2e" in listing.stdout and "Pending" in listing.stdout

        up.send_signal(signal.SIGINT)
        assert up.wait(30) == 0
        assert descendants_alive(tree) == []
        assert "Nest is starting" in (tmp_path / "up.log").read_text()
    finally:
        kill_group(up)


async def test_sigkilled_nest_up_leaves_nothing_and_the_next_start_recovers(
    tmp_path: Path,
) -> None:
    port = free_port()
    data = tmp_path / "data"
    # No NEST_ADMIN_TOKEN: the first start generates the admin token and prints it once.
    env: dict[str, str | None] = {
        "NEST_DATA_DIR": str(data),
        "NEST_API_PORT": str(port),
        "NEST_ADMIN_TOKEN": None,
        "NEST_TOKEN": None,
    }
    os.environ.pop("NEST_NATS_URL", None)
    up = nest_process(["up"], env, tmp_path / "up-1.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout=60, process=up)
        token_file = data / "admin-token"
        for _ in range(100):
            if "Admin token" in (tmp_path / "up-1.log").read_text():
                break
            time.sleep(0.1)
        token = token_file.read_text().strip()
        assert token.startswith("nest_") and token_file.stat().st_mode & 0o777 == 0o600
        assert token in (tmp_path / "up-1.log").read_text()
        assert token not in (data / "logs" / "api.log").read_text()  # never logged
        auth = {"Authorization": f"Bearer {token}"}
        created = httpx.post(
            f"http://127.0.0.1:{port}/api/v1/clusters", json={"name": "kept"}, headers=auth
        )
        assert created.status_code == 201
        tree = wait_for_tree(up.pid, 2)
        os.kill(up.pid, signal.SIGKILL)  # only the supervisor: the kernel must take its children
        up.wait(10)
        deadline = time.monotonic() + 10
        while descendants_alive(tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert descendants_alive(tree) == []
    finally:
        kill_group(up)

    up = nest_process(["up"], env, tmp_path / "up-2.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout=60, process=up)
        listed = httpx.get(f"http://127.0.0.1:{port}/api/v1/clusters", headers=auth).json()
        assert [c["name"] for c in listed["items"]] == ["kept"]
        assert token_file.read_text().strip() == token  # not regenerated
        up.send_signal(signal.SIGINT)
        assert up.wait(30) == 0
        assert token not in (tmp_path / "up-2.log").read_text()  # shown once only
    finally:
        kill_group(up)
