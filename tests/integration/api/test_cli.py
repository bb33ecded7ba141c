"""The `nest` CLI against a live API: listings that fit 80 columns, server text shown as sent,
errors once and with what to do, clean help, and a kubeconfig file written only on success.

The API runs as `nest run api` with its own nats-server; the test publishes what the provisioner
would (status events) and answers its kubeconfig requests, to put clusters in the states a user
meets. Every command runs as a real `nest` subprocess at COLUMNS=80 unless a test says otherwise.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from libs.common.bus import Bus, RpcError
from libs.common.contract.cluster import ClusterStatusChanged, Condition
from libs.common.contract.kubeconfig import KUBECONFIG_RPC_SUBJECT
from libs.common.nats_server import EmbeddedNats
from tests.support.parts import free_port
from tests.support.processes import ADMIN_TOKEN, AUTH, kill_group, nest_process, wait_http

ROOT = Path(__file__).resolve().parents[3]
WIDTH = 80
T = TypeVar("T")


class BusThread:
    """A Bus on its own event loop thread, so that sync tests can publish what the provisioner
    would and answer its requests while a `nest` subprocess runs."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.bus = Bus([url], name="test-cli")
        self.run(self.bus.connect())

    def run(self, coro: Awaitable[T]) -> T:
        async def wrapped() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(30)

    def close(self) -> None:
        self.run(self.bus.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass
class LiveApi:
    url: str
    bus: BusThread


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApi]:
    """`nest run api` on SQLite with its own nats-server, and a bus to play the provisioner."""
    tmp: Path = tmp_path_factory.mktemp("cli-api")
    nats = EmbeddedNats(tmp / "nats")
    nats.start()
    port = free_port()
    env: dict[str, str | None] = {
        "NEST_DATA_DIR": str(tmp / "data"),
        "NEST_NATS_URL": nats.url,
        "NEST_API_PORT": str(port),
        "NEST_RATE_LIMIT_PER_SECOND": "100000",
        "NEST_RATE_LIMIT_BURST": "100000",
        "NEST_LOG_LEVEL": "WARNING",
    }
    api = nest_process(["run", "api"], env, tmp / "api.log")
    bus = None
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout=60, process=api)
        bus = BusThread(nats.url)
        yield LiveApi(f"http://127.0.0.1:{port}", bus)
    finally:
        if bus is not None:
            bus.close()
        kill_group(api)
        nats.stop()


def nest(
    api_url: str | None,
    *args: str,
    token: str | None = ADMIN_TOKEN,
    home: Path | None = None,
    columns: int = WIDTH,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`nest <args>` as a user runs it, its output not a terminal, COLUMNS as given."""
    full = {**os.environ, "COLUMNS": str(columns), **(env or {})}
    for name in ("NEST_API_URL", "NEST_TOKEN", "NEST_NATS_URL"):
        full.pop(name, None)
    if api_url is not None:
        full["NEST_API_URL"] = api_url
    if token is not None:
        full["NEST_TOKEN"] = token
    if home is not None:
        full["XDG_CONFIG_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


def assert_fits(text: str, width: int = WIDTH) -> None:
    too_long = [line for line in text.splitlines() if len(line.rstrip()) > width]
    assert not too_long, f"lines over {width} columns: {too_long}"


def row_of(listing: str, name: str) -> list[str]:
    """The cells of the listing's row that starts with `name` (cells are 2+ spaces apart)."""
    for line in listing.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] == name:
            return cells
    raise AssertionError(f"no row for {name!r} in:\n{listing}")


def condition(kind: str, status: str, reason: str, message: str) -> Condition:
    return Condition(
        type=kind,
        status=status,  # type: ignore[arg-type]
        reason=reason,
        message=message,
        last_transition_time=datetime.now(UTC),
    )


def report(live: LiveApi, ref: str, phase: str, *conditions: Condition, **extra: Any) -> str:
    """Publish a status of cluster `ref` (name or id) as the provisioner does, wait until the API
    shows it; returns the cluster's id."""
    cluster = api_get(live, ref)
    event = ClusterStatusChanged(
        cluster_id=cluster["id"],
        observed_generation=cluster["generation"],
        phase=phase,  # type: ignore[arg-type]
        conditions=list(conditions),
        **extra,
    )
    live.bus.run(live.bus.bus.publish(event, source="provisioner", subject=cluster["id"]))
    for _ in range(200):
        status = api_get(live, cluster["id"])["status"]
        shown = {c["type"] for c in status.get("conditions") or []}
        if status["phase"] == phase and shown == {c.type for c in conditions}:
            return str(cluster["id"])
        live.bus.run(asyncio.sleep(0.05))
    raise AssertionError(f"the API never showed {phase}: {status}")


def api_get(live: LiveApi, ref: str) -> dict[str, Any]:
    """A cluster as the API shows it, by id or name (straight from the API, not the CLI)."""
    found = httpx.get(f"{live.url}/api/v1/clusters/{ref}", headers=AUTH)
    if found.status_code == 200:
        return dict(found.json())
    items = httpx.get(f"{live.url}/api/v1/clusters", headers=AUTH, params={"limit": 500})
    return next(item for item in items.json()["items"] if item["name"] == ref)


def create(live: LiveApi, name: str, *args: str) -> str:
    """Create a cluster with the CLI; returns the id prefix its listing shows."""
    created = nest(live.url, "clusters", "create", name, *args, columns=200)
    assert created.returncode == 0, created.stderr
    return row_of(created.stdout, name)[1]


NO_MANAGEMENT = condition(
    "ManagementClusterAvailable",
    "False",
    "NotConfigured",
    "no management cluster configured: set NEST_KUBECONFIG, or run Nest inside the "
    "management cluster",
)


def test_clusters_commands(live: LiveApi) -> None:
    created = nest(
        live.url, "clusters", "create", "cli-demo", "--replicas", "3", "--label", "team=a"
    )
    assert created.returncode == 0, created.stderr
    assert "cli-demo" in created.stdout and "NAME" in created.stdout
    listed = nest(live.url, "clusters", "list")
    assert row_of(listed.stdout, "cli-demo")[2] == "Pending"
    shown = nest(live.url, "clusters", "get", "cli-demo")
    assert shown.returncode == 0 and "team=a" in shown.stdout
    # The id prefix a listing shows is what every command takes.
    prefix = row_of(listed.stdout, "cli-demo")[1]
    assert len(prefix) == 8
    by_prefix = nest(live.url, "clusters", "get", prefix)
    assert by_prefix.returncode == 0, by_prefix.stderr
    assert "Name:       cli-demo" in by_prefix.stdout
    gone = nest(live.url, "clusters", "delete", prefix, "--yes")
    assert gone.returncode == 0 and "Deleting" in gone.stdout
    missing = nest(live.url, "clusters", "get", "no-such-cluster")
    assert missing.returncode == 1 and "no cluster" in missing.stderr
    assert "nest clusters list" in missing.stderr


def test_listings_fit_80_columns_and_keep_names_ids_and_phases(live: LiveApi) -> None:
    long_name = "payments-production-eu-west-cluster-01"  # 38 characters
    ready_id = create(live, long_name, "--label", "team=payments")
    report(
        live,
        long_name,
        "Ready",
        condition("ControlPlaneReady", "True", "Available", "2/2 replicas ready"),
        endpoint={"host": "192.168.100.200", "port": 31234},
    )
    create(live, "short")
    listed = nest(live.url, "clusters", "list")
    assert listed.returncode == 0, listed.stderr
    assert_fits(listed.stdout)
    ready = row_of(listed.stdout, long_name)
    assert ready[1] == ready_id and ready[2] == "Ready"
    assert row_of(listed.stdout, "short")[2] == "Pending"
    # One line per cluster: nothing (a timestamp, an id) wraps onto a second line.
    phases = {"Pending", "Provisioning", "Ready", "Degraded", "Deleting", "Failed"}
    for line in listed.stdout.splitlines()[1:]:
        assert re.split(r"\s{2,}", line.strip())[2] in phases, listed.stdout
    # A wide terminal shows the columns a narrow one leaves out.
    wide = nest(live.url, "clusters", "list", columns=200)
    assert "192.168.100.200:31234" in row_of(wide.stdout, long_name)
    assert "AGE" in wide.stdout and "GEN" in wide.stdout

    token = nest(
        live.url, "token", "create", "a-token-with-a-rather-long-name-for-ci", "--days", "30"
    )
    assert token.returncode == 0, token.stderr
    assert_fits(token.stdout)
    tokens = nest(live.url, "token", "list")
    assert_fits(tokens.stdout)
    cells = row_of(tokens.stdout, "a-token-with-a-rather-long-name-for-ci")
    assert re.fullmatch(r"[0-9a-f]{8}", cells[1]), cells
    assert "active" in cells


def test_server_text_is_shown_as_sent(live: LiveApi) -> None:
    """Nothing from the server is read as markup or emoji codes."""
    name = "[bold]ci[/bold] :smile: [a-z0-9]"
    created = nest(live.url, "token", "create", name)
    assert created.returncode == 0, created.stderr
    assert name in created.stdout
    assert name in nest(live.url, "token", "list", columns=200).stdout
    create(live, "cli-restored")
    restore = nest(
        live.url, "backups", "restore", "not-a-backup-id", "--cluster", "cli-restored", "--yes"
    )
    assert restore.returncode == 1
    assert "Traceback" not in restore.stderr
    # The pattern arrives whole, brackets and all, and once.
    assert restore.stderr.count(r"'^\d{8}T\d{6}Z-[a-z0-9]{8,32}$'") == 1, restore.stderr


def test_validation_errors_are_printed_once(live: LiveApi) -> None:
    bad = nest(live.url, "clusters", "create", "Bad_Name", "--replicas", "9")
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: invalid input:")
    assert bad.stderr.count("must be a DNS-1123 label") == 1, bad.stderr
    assert bad.stderr.count("less than or equal to 5") == 1, bad.stderr
    assert "- name: must be" in bad.stderr and "- spec.controlPlane.replicas:" in bad.stderr


@pytest.mark.parametrize("suffix", ["", "/", "/api/v1", "/api/v1/"])
def test_the_url_nest_up_prints_works_as_api_url(live: LiveApi, suffix: str) -> None:
    by_option = nest(None, "clusters", "list", "--api-url", live.url + suffix)
    assert by_option.returncode == 0, by_option.stderr
    by_env = nest(live.url + suffix, "clusters", "list")
    assert by_env.returncode == 0, by_env.stderr


def test_a_refused_connection_says_the_api_is_not_running(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    by_env = nest(f"http://127.0.0.1:{port}/api/v1", "clusters", "list")
    assert by_env.returncode == 1
    assert f"not running at http://127.0.0.1:{port} " in by_env.stderr
    assert "nest up" in by_env.stderr and "NEST_API_URL" in by_env.stderr
    by_option = nest(None, "clusters", "list", "--api-url", f"127.0.0.1:{port}")
    assert by_option.returncode == 1 and "--api-url" in by_option.stderr
    by_settings = nest(
        None,
        "clusters",
        "list",
        env={"NEST_API_PORT": str(port), "NEST_DATA_DIR": str(tmp_path)},
    )
    assert by_settings.returncode == 1
    assert "nest up" in by_settings.stderr and "Traceback" not in by_settings.stderr


def test_a_wrong_path_asks_whether_it_is_the_api(live: LiveApi) -> None:
    wrong = nest(None, "clusters", "list", "--api-url", live.url + "/nest")
    assert wrong.returncode == 1
    assert f"Not Found: {live.url}/nest/api/v1/clusters" in wrong.stderr
    assert f"is {live.url}/nest where the Nest API runs?" in wrong.stderr


def test_no_token_says_where_one_is(live: LiveApi, tmp_path: Path) -> None:
    anonymous = nest(
        live.url, "clusters", "list", token=None, home=tmp_path, env={"NEST_DATA_DIR": "/nowhere"}
    )
    assert anonymous.returncode == 1
    assert "nest login" in anonymous.stderr and "/nowhere/admin-token" in anonymous.stderr


class Provisioner:
    """Answers kubeconfig requests as the provisioner does (or fails them, if told to)."""

    def __init__(self, live: LiveApi, fail: str | None = None) -> None:
        self.live = live
        self.fail = fail
        self.subscription: Any = None

    async def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.fail:
            raise RpcError(self.fail, "the cluster's CA cannot be read right now")
        return {
            "kubeconfig": f"apiVersion: v1\nkind: Config\n# {body['name']}\n",
            "expiresAt": "2030-01-01T00:00:00Z",
        }

    def __enter__(self) -> Provisioner:
        serve: Callable[..., Awaitable[Any]] = self.live.bus.bus.serve
        self.subscription = self.live.bus.run(
            serve(KUBECONFIG_RPC_SUBJECT, self.answer, queue="provisioner")
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.bus.run(self.subscription.unsubscribe())


def test_kubeconfig_output_is_written_only_on_success(live: LiveApi, tmp_path: Path) -> None:
    create(live, "kc-cli")
    target = tmp_path / "kc-cli.kubeconfig"

    # No management cluster: the cluster stays Pending, with no endpoint. Nothing is written,
    # and the message says why and what to do.
    report(live, "kc-cli", "Pending", NO_MANAGEMENT)
    refused = nest(live.url, "clusters", "kubeconfig", "kc-cli", "-o", str(target))
    assert refused.returncode == 1
    assert not target.exists() and list(tmp_path.iterdir()) == []
    assert "kc-cli has no API endpoint yet" in refused.stderr
    assert "Pending, with ManagementClusterAvailable=False" in refused.stderr
    assert "NEST_KUBECONFIG" in refused.stderr and "scripts/dev-kube" in refused.stderr

    # Ready: the file is written whole, mode 0600.
    report(
        live,
        "kc-cli",
        "Ready",
        condition("ControlPlaneReady", "True", "Available", "2/2 replicas ready"),
        endpoint={"host": "10.0.0.10", "port": 6443},
    )
    with Provisioner(live):
        issued = nest(live.url, "clusters", "kubeconfig", "kc-cli", "--output", str(target))
    assert issued.returncode == 0, issued.stderr
    assert target.read_text() == "apiVersion: v1\nkind: Config\n# kc-cli\n"
    assert target.stat().st_mode & 0o777 == 0o600
    assert f"Wrote {target}" in issued.stdout and "2030-01-01" in issued.stdout

    # A failure later leaves the file as it was, and no temporary file behind.
    with Provisioner(live, fail="unavailable"):
        failed = nest(live.url, "clusters", "kubeconfig", "kc-cli", "-o", str(target))
    assert failed.returncode == 1
    assert "cannot be read right now" in failed.stderr and "Traceback" not in failed.stderr
    assert target.read_text() == "apiVersion: v1\nkind: Config\n# kc-cli\n"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]

    # Without --output it goes to stdout, the expiry to stderr.
    with Provisioner(live):
        printed = nest(live.url, "clusters", "kubeconfig", "kc-cli")
    assert printed.stdout.startswith("apiVersion: v1") and "2030-01-01" in printed.stderr


def test_backup_commands(live: LiveApi) -> None:
    create(live, "cli-backed")
    # Its etcd is not running: refused with the reason, nothing requested.
    refused = nest(live.url, "backups", "run", "--cluster", "cli-backed")
    assert refused.returncode == 1
    assert "cli-backed cannot be backed up: its etcd is not ready" in refused.stderr
    assert "Pending" in refused.stderr
    report(live, "cli-backed", "Pending", NO_MANAGEMENT)
    refused = nest(live.url, "backups", "run", "--cluster", "cli-backed")
    assert refused.returncode == 1 and "NEST_KUBECONFIG" in refused.stderr
    # Once its etcd is ready, a backup is requested.
    report(live, "cli-backed", "Ready", condition("DatastoreReady", "True", "Available", "3/3"))
    requested = nest(live.url, "backups", "run", "--cluster", "cli-backed", "--no-wait")
    assert requested.returncode == 0, requested.stderr
    assert "cluster-cli-backed" in requested.stdout and "requested" in requested.stdout
    foundry = nest(live.url, "backups", "run", "--foundry", "--no-wait")
    assert foundry.returncode == 0 and "foundry" in foundry.stdout
    # No backup service runs here: a run that waits says so when its time is up.
    waited = nest(live.url, "backups", "run", "--foundry", "--timeout", "2")
    assert waited.returncode == 1
    assert "has not started the backup of foundry within 2 s" in waited.stderr
    assert "nest up" in waited.stderr
    both = nest(live.url, "backups", "run", "--foundry", "--cluster", "cli-backed")
    assert both.returncode == 2 and "exactly one" in both.stderr
    unknown_policy = nest(live.url, "backups", "run", "--foundry", "--policy", "nope", "--no-wait")
    assert unknown_policy.returncode == 1 and "policyId" in unknown_policy.stderr
    listed = nest(live.url, "backups", "list", "--cluster", "cli-backed")
    assert listed.returncode == 0 and "No backups." in listed.stdout


def test_token_commands_and_login(live: LiveApi, tmp_path: Path) -> None:
    created = nest(live.url, "token", "create", "ci", "--scope", "operator")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip().splitlines()[-1]
    assert secret.startswith("nest_")
    listed = nest(live.url, "token", "list")
    row = row_of(listed.stdout, "ci")
    assert "operator" in row and secret not in listed.stdout
    as_operator = nest(live.url, "token", "list", token=secret)
    assert as_operator.returncode == 1 and "admin scope" in as_operator.stderr
    login = nest(live.url, "login", "--token", secret, token=None, home=tmp_path)
    assert login.returncode == 0, login.stderr
    saved = tmp_path / "nest" / "config.json"
    assert saved.stat().st_mode & 0o777 == 0o600
    assert nest(live.url, "clusters", "list", token=None, home=tmp_path).returncode == 0
    revoked = nest(live.url, "token", "revoke", row[1])  # the id prefix the listing shows
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    refused = nest(live.url, "clusters", "list", token=secret)
    assert refused.returncode == 1 and "nest login" in refused.stderr


def help_pages() -> list[list[str]]:
    import typer.main

    from cli.main import app

    pages: list[list[str]] = []

    def walk(command: Any, path: list[str]) -> None:
        pages.append(path)
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return pages


@pytest.mark.parametrize("path", help_pages(), ids=lambda p: " ".join(p) or "nest")
def test_help_is_clean_at_80_columns(path: list[str]) -> None:
    shown = nest(None, *path, "--help")
    assert shown.returncode == 0, shown.stderr
    assert_fits(shown.stdout, 80)
    # Placeholders say what to give (NAME, URL, SECONDS), never a Python type.
    assert not re.search(r"<(str|int|float|bool|path|list\[str\])>", shown.stdout), shown.stdout
    assert not re.search(r"--[A-Z]", shown.stdout), shown.stdout
    # Command summaries are whole sentences, not cut off.
    commands = shown.stdout.partition("Commands:")[2]
    assert "..." not in commands, shown.stdout
