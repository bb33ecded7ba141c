"""The `nest` CLI against a live API: readable tables, clear errors, tokens shown once."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.support.processes import ADMIN_TOKEN

ROOT = Path(__file__).resolve().parents[3]


def nest(
    live_api: str, *args: str, token: str = ADMIN_TOKEN, home: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NEST_API_URL": live_api, "NEST_TOKEN": token, "COLUMNS": "200"}
    if home is not None:
        env["XDG_CONFIG_HOME"] = str(home)
        env.pop("NEST_TOKEN")
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


def test_clusters_commands(live_api: str) -> None:
    created = nest(
        live_api, "clusters", "create", "cli-demo", "--replicas", "3", "--label", "team=a"
    )
    assert created.returncode == 0, created.stderr
    assert "cli-demo" in created.stdout and "NAME" in created.stdout
    listed = nest(live_api, "clusters", "list")
    assert "cli-demo" in listed.stdout and "Pending" in listed.stdout
    shown = nest(live_api, "clusters", "get", "cli-demo")
    assert shown.returncode == 0 and "cli-demo" in shown.stdout
    bad = nest(live_api, "clusters", "create", "Bad_Name")
    assert bad.returncode == 1
    assert "name:" in bad.stderr and "Traceback" not in bad.stderr
    gone = nest(live_api, "clusters", "delete", "cli-demo", "--yes")
    assert gone.returncode == 0 and "Deleting" in gone.stdout
    missing = nest(live_api, "clusters", "get", "no-such-cluster")
    assert missing.returncode == 1 and "no cluster" in missing.stderr


def test_token_commands_and_login(live_api: str, tmp_path: Path) -> None:
    created = nest(live_api, "token", "create", "ci", "--scope", "operator")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip().splitlines()[-1]
    assert secret.startswith("nest_")
    listed = nest(live_api, "token", "list")
    assert "ci" in listed.stdout and "operator" in listed.stdout and secret not in listed.stdout
    as_operator = nest(live_api, "token", "list", token=secret)
    assert as_operator.returncode == 1 and "admin scope" in as_operator.stderr
    login = subprocess.run(
        [sys.executable, "-m", "cli.main", "login", "--token", secret],
        env={**os.environ, "NEST_API_URL": live_api, "XDG_CONFIG_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert login.returncode == 0, login.stderr
    saved = tmp_path / "nest" / "config.json"
    assert saved.stat().st_mode & 0o777 == 0o600
    assert nest(live_api, "clusters", "list", home=tmp_path).returncode == 0
    uuid = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
    row = next(line for line in listed.stdout.splitlines() if " ci " in line)
    token_id = uuid.findall(row)[0]
    revoked = nest(live_api, "token", "revoke", token_id)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    assert nest(live_api, "clusters", "list", token=secret).returncode == 1


def test_backup_commands(live_api: str) -> None:
    created = nest(live_api, "clusters", "create", "cli-backed")
    assert created.returncode == 0, created.stderr
    requested = nest(live_api, "backups", "run", "--cluster", "cli-backed")
    assert requested.returncode == 0, requested.stderr
    assert "cluster-cli-backed" in requested.stdout and "requested" in requested.stdout
    foundry = nest(live_api, "backups", "run", "--foundry")
    assert foundry.returncode == 0 and "foundry" in foundry.stdout
    both = nest(live_api, "backups", "run", "--foundry", "--cluster", "cli-backed")
    assert both.returncode == 2 and "exactly one" in both.stderr
    unknown_policy = nest(live_api, "backups", "run", "--foundry", "--policy", "nope")
    assert unknown_policy.returncode == 1 and "policyId" in unknown_policy.stderr
    # No backup service runs here: nothing has been reported yet.
    listed = nest(live_api, "backups", "list", "--cluster", "cli-backed")
    assert listed.returncode == 0 and "No backups." in listed.stdout
    restore = nest(
        live_api,
        "backups",
        "restore",
        "20260101T000000Z-0000abcd",
        "--cluster",
        "cli-backed",
        "--yes",
    )
    assert restore.returncode == 1
    assert "backupId" in restore.stderr and "Traceback" not in restore.stderr
