"""Start `nest` commands as real subprocesses for crash and end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ADMIN_TOKEN = "nest-test-admin-token-0123456789abcdef0123"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def nest_process(args: list[str], env: dict[str, str | None], log: Path) -> subprocess.Popen[bytes]:
    """`python -m cli.main <args>` in its own process group, output to `log`.

    `env` adds to the test's environment; a None value removes that variable.
    """
    merged = {**os.environ, "NEST_ADMIN_TOKEN": ADMIN_TOKEN, "NEST_TOKEN": ADMIN_TOKEN, **env}
    full_env = {k: v for k, v in merged.items() if v is not None}
    full_env.pop("NEST_REQUIRE_ALL", None)
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cli.main", *args],
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=Path(__file__).resolve().parents[2],
        )


def wait_http(
    url: str, timeout: float = 30.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"process exited with {process.returncode} before {url} answered")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {timeout}s")


def kill_group(process: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)


def descendants_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        # A zombie is gone for our purposes.
        with contextlib.suppress(OSError):
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
            if state == "Z":
                continue
        alive.append(pid)
    return alive


def process_tree(root: int) -> list[int]:
    """Every descendant pid of `root` (from /proc), found by parent links."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int((entry / "stat").read_text().split(")")[-1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found
