"""Idle memory of `nest up`: the resident set (RSS) of every process it starts, and their total.

Starts `nest up` on a fresh data dir (no management cluster configured, the newcomer's case),
waits until the API and every service answer /readyz, lets it settle, then samples each process
of the tree a few times and prints the last sample (RSS and PSS: PSS shares a page among the
processes that map it, so the PSS total is what the tree really costs the machine).

    python bench/idle_rss.py                 # start `nest up`, measure, stop it
    python bench/idle_rss.py --pid 12345     # measure a `nest up` that is already running
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from libs.common.nats_server import free_port  # noqa: E402

MIB = 1 << 20


def label(process: psutil.Process) -> str:
    """`supervisor`, `nats-server` or the service a child runs."""
    cmdline = process.cmdline()
    if not cmdline:
        return process.name()
    if "nats-server" in Path(cmdline[0]).name:
        return "nats-server"
    if "up" in cmdline:
        return "supervisor (nest up)"
    for service in ("api", "provisioner", "backup"):
        if service in cmdline or any(f"services.{service}." in part for part in cmdline):
            return service
    return " ".join(cmdline)[:40]


def sample(root: int) -> list[tuple[str, int, float, float]]:
    """(label, pid, RSS MiB, PSS MiB) of `root` and every descendant."""
    top = psutil.Process(root)
    rows = []
    for process in [top, *top.children(recursive=True)]:
        try:
            full = process.memory_full_info()
            rows.append((label(process), process.pid, full.rss / MIB, full.pss / MIB))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return rows


def wait_ready(api: str, data_dir: Path, timeout: float) -> None:
    """The API answers /readyz and every service logged that it started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            api_ready = httpx.get(f"{api}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            api_ready = False
        logs = data_dir / "logs"
        started = all(
            (logs / f"{name}.log").exists()
            and f'"{name} started"' in (logs / f"{name}.log").read_text(errors="replace")
            for name in ("provisioner", "backup")
        )
        if api_ready and started:
            return
        time.sleep(0.2)
    raise SystemExit(f"nest up was not ready within {timeout:g}s (logs: {data_dir / 'logs'})")


def report(root: int, settle: float, samples: int) -> None:
    time.sleep(settle)
    rows: list[tuple[str, int, float, float]] = []
    for _ in range(samples):
        rows = sample(root)
        time.sleep(1.0)
    print(f"{'process':<24} {'pid':>8} {'RSS MiB':>9} {'PSS MiB':>9}")
    for name, pid, rss, pss in sorted(rows, key=lambda row: -row[2]):
        print(f"{name:<24} {pid:>8} {rss:>9.1f} {pss:>9.1f}")
    total_rss = sum(row[2] for row in rows)
    total_pss = sum(row[3] for row in rows)
    print(f"{'total':<24} {'':>8} {total_rss:>9.1f} {total_pss:>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pid", type=int, help="measure this running `nest up` instead")
    parser.add_argument("--settle", type=float, default=15.0, help="seconds idle before sampling")
    parser.add_argument("--samples", type=int, default=3)
    args = parser.parse_args()
    if args.pid:
        report(args.pid, 0.0, args.samples)
        return
    with tempfile.TemporaryDirectory(prefix="nest-rss-") as scratch:
        data_dir = Path(scratch) / "data"
        port = free_port()
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("NEST_") or key == "NEST_LOG_LEVEL"
        }
        env.update(
            NEST_DATA_DIR=str(data_dir),
            NEST_API_PORT=str(port),
            NEST_ADMIN_TOKEN="nest-bench-admin-token-0123456789abcdef0123",
        )
        log = Path(scratch) / "up.log"
        with log.open("wb") as out:
            up = subprocess.Popen(
                [sys.executable, "-m", "cli.main", "up"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=ROOT,
            )
        try:
            wait_ready(f"http://127.0.0.1:{port}", data_dir, timeout=90)
            report(up.pid, args.settle, args.samples)
        finally:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
                up.wait(10)


if __name__ == "__main__":
    main()
