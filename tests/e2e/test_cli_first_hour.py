"""A newcomer's first hour with the `nest` CLI, end to end: `nest up` on a fresh data dir with no
management cluster, and the README's commands at 80 columns, using the URL `nest up` prints and
the admin token it writes. What cannot work without a management cluster says why and what to
do, and leaves nothing behind; what can (the Foundry DB backup) is followed to its end."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.parts import free_port
from tests.support.processes import kill_group, nest_process, wait_http

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
WIDTH = 80


def fits(text: str) -> bool:
    return all(len(line.rstrip()) <= WIDTH for line in text.splitlines())


def row_of(listing: str, first: str) -> list[str]:
    for line in listing.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] == first:
            return cells
    raise AssertionError(f"no row for {first!r} in:\n{listing}")


def test_first_hour_without_a_management_cluster(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    clean = {
        "NEST_DATA_DIR": str(data),
        "NEST_API_PORT": str(port),
        "NEST_BACKUP_SERVE_PORT": "0",
        # A newcomer has none of these: the admin token is generated, no management cluster.
        "NEST_ADMIN_TOKEN": None,
        "NEST_TOKEN": None,
        "NEST_KUBECONFIG": None,
        "NEST_NATS_URL": None,
        "NEST_DATABASE_URL": None,
        "NEST_API_URL": None,
        "KUBERNETES_SERVICE_HOST": None,
    }
    log = tmp_path / "up.log"
    up = nest_process(["up"], clean, log)
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout=90, process=up)
        deadline = time.monotonic() + 30
        while "Press Ctrl-C" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        printed = log.read_text()
        api_url = re.search(r"API at (\S+)", printed)
        assert api_url is not None, printed
        assert api_url.group(1) == f"http://127.0.0.1:{port}/api/v1"
        assert f"Backups: {data / 'backups'}" in printed
        assert "No management cluster (NEST_KUBECONFIG)" in printed
        assert f"also in {data / 'admin-token'}, mode 0600):" in printed

        env = {
            k: v for k, v in {**os.environ, **clean}.items() if v is not None and k != "NEST_TOKEN"
        }
        env |= {"NEST_API_URL": api_url.group(1), "COLUMNS": str(WIDTH)}

        def nest(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "cli.main", *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                cwd=ROOT,
                check=False,
            )

        created = nest("clusters", "create", "demo")
        assert created.returncode == 0, created.stderr
        assert fits(created.stdout)

        # The provisioner reports that it has no management cluster.
        deadline = time.monotonic() + 60
        shown = nest("clusters", "get", "demo")
        while "ManagementClusterAvailable" not in shown.stdout and time.monotonic() < deadline:
            time.sleep(0.5)
            shown = nest("clusters", "get", "demo")
        assert shown.returncode == 0, shown.stderr
        assert fits(shown.stdout), shown.stdout
        assert re.search(r"ManagementClusterAvailable\s+False", shown.stdout), shown.stdout
        assert "scripts/dev-kube" in shown.stderr

        listed = nest("clusters", "list")
        assert fits(listed.stdout) and row_of(listed.stdout, "demo")[2] == "Pending"

        kubeconfig = nest("clusters", "kubeconfig", "demo", "-o", str(tmp_path / "demo.kubeconfig"))
        assert kubeconfig.returncode == 1
        assert not (tmp_path / "demo.kubeconfig").exists()
        assert "ManagementClusterAvailable=False" in kubeconfig.stderr
        assert "NEST_KUBECONFIG" in kubeconfig.stderr and "scripts/dev-kube" in kubeconfig.stderr

        cluster_backup = nest("backups", "run", "--cluster", "demo")
        assert cluster_backup.returncode == 1
        assert "demo cannot be backed up" in cluster_backup.stderr
        assert "No backups." in nest("backups", "list", "--cluster", "demo").stdout

        foundry = nest("backups", "run", "--foundry")
        assert foundry.returncode == 0, foundry.stderr
        done = re.search(r"Completed backup (\S+) of foundry", foundry.stdout)
        assert done is not None, foundry.stdout
        backups = nest("backups", "list")
        assert fits(backups.stdout), backups.stdout
        assert row_of(backups.stdout, done.group(1))[1:3] == ["foundry", "Completed"]

        token = nest("token", "create", "ci", "--scope", "operator")
        assert token.returncode == 0, token.stderr
        tokens = nest("token", "list")
        assert fits(tokens.stdout) and row_of(tokens.stdout, "ci")[2] == "operator"

        local = nest("restore", "foundry", "--location", str(data / "backups"), "--list")
        assert local.returncode == 0, local.stderr
        assert fits(local.stdout), local.stdout
        assert row_of(local.stdout, done.group(1))  # listed whole
        # Newest first, the newest marked as what a restore takes (the hourly schedule may have
        # added one of its own meanwhile).
        assert local.stdout.splitlines()[2].rstrip().endswith("← default"), local.stdout

        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0
        stopped = nest("clusters", "list")
        assert stopped.returncode == 1
        assert "not running" in stopped.stderr and "nest up" in stopped.stderr
    finally:
        kill_group(up)
