"""`nest up`: the embedded NATS server plus every service, each in its own process.

Children run in their own process groups and get SIGKILL from the kernel if the supervisor
dies (PR_SET_PDEATHSIG), so even a SIGKILLed `nest up` leaves nothing behind. A child that
crashes is restarted with backoff. Ctrl-C or SIGTERM stops them all: SIGTERM, a bounded wait,
then SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from libs.common.runner import resolve_nats
from libs.common.settings import Settings

PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    os.setsid()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Child:
    service: str
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        services: Sequence[str],
        *,
        say: Callable[[str], None] = print,
    ) -> None:
        self.settings = settings
        self.services = list(services)
        self.say = say
        self.children = [Child(name) for name in self.services]
        self._stopping = False

    def _spawn(self, child: Child, env: dict[str, str]) -> None:
        log_dir = self.settings.data_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        with (log_dir / f"{child.service}.log").open("ab") as log_file:
            child.process = subprocess.Popen(
                [sys.executable, "-m", "cli.main", "run", child.service],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_child_setup,  # noqa: PLW1509 - setsid + pdeathsig
            )
        child.started_at = time.monotonic()

    def _request_stop(self, *_: object) -> None:
        self._stopping = True

    def run(self, on_ready: Callable[[], None] | None = None) -> int:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        nats = resolve_nats(self.settings, reuse=False)
        env = {
            **os.environ,
            "NEST_NATS_URL": nats.url,
            "NEST_DATA_DIR": str(self.settings.data_dir),
        }
        signal.signal(signal.SIGINT, self._request_stop)
        signal.signal(signal.SIGTERM, self._request_stop)
        try:
            for child in self.children:
                self._spawn(child, env)
            if on_ready is not None:
                on_ready()
            while not self._stopping:
                self._watch(env)
                time.sleep(0.2)
        finally:
            self._stop_children()
            nats.stop()
        return 0

    def _watch(self, env: dict[str, str]) -> None:
        now = time.monotonic()
        for child in self.children:
            process = child.process
            if process is not None and process.poll() is None:
                continue
            if process is not None:
                code = process.returncode
                # A child that ran a while before dying gets its backoff reset.
                if now - child.started_at > 60:
                    child.restarts = 0
                delay = min(2**child.restarts, 30)
                child.restarts += 1
                child.next_start = now + delay
                child.process = None
                self.say(
                    f"{child.service} exited with code {code}; restarting in {delay}s "
                    f"(log: {self.settings.data_dir / 'logs' / (child.service + '.log')})"
                )
            if now >= child.next_start:
                self._spawn(child, env)

    def _stop_children(self) -> None:
        live = [c.process for c in self.children if c.process and c.process.poll() is None]
        for process in live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_timeout_seconds + 5
        for process in live:
            try:
                process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
