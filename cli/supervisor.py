"""`nest up`: the embedded NATS server plus every service, each in its own process.

Each child is kept running by a task of its own in a `TaskSet` (`child-<service>`): it starts
the service, waits for it to exit and, unless Nest is stopping, restarts it with backoff.
Children run in their own process groups and get SIGKILL from the kernel if the supervisor
dies (PR_SET_PDEATHSIG), so even a SIGKILLed `nest up` leaves nothing behind. Ctrl-C or SIGTERM
stops them all at once: SIGTERM, a bounded wait, then SIGKILL.

The supervisor imports no NATS client and no service: a child runs `python -m cli.supervisor
<service>`, which imports only that service, so the processes of an idle `nest up` stay small
(docs/benchmarks.md, "Idle memory").
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from libs.common.nats_server import resolve_nats
from libs.common.settings import Settings
from libs.common.tasks import TaskSet

PR_SET_PDEATHSIG = 1
RESTART_RESET_SECONDS = 60.0
"""A child that ran this long before it died starts again after the shortest delay."""
MAX_RESTART_DELAY = 30


def _child_setup() -> None:
    os.setsid()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Child:
    """One service process and its restart bookkeeping."""

    service: str
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    started_at: float = 0.0


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

    def log_of(self, child: Child) -> Path:
        return self.settings.data_dir / "logs" / f"{child.service}.log"

    def run(self, on_ready: Callable[[], None] | None = None) -> int:
        """Run until SIGINT or SIGTERM; `on_ready` runs (in a thread) once every child started."""
        return asyncio.run(self._run(on_ready))

    async def _run(self, on_ready: Callable[[], None] | None) -> int:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        nats = resolve_nats(self.settings, reuse=False)
        env = {
            **os.environ,
            "NEST_NATS_URL": nats.url,
            "NEST_DATA_DIR": str(self.settings.data_dir),
        }
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        tasks = TaskSet()
        try:
            for child in self.children:
                await self._start(child, env)
                tasks.spawn(f"child-{child.service}", self._keep_running(child, env))
            if on_ready is not None:
                tasks.spawn("ready", asyncio.to_thread(on_ready))
            await stop.wait()
        finally:
            self._stopping = True
            # Each child task stops its process when cancelled: all of them at once.
            await tasks.stop(self.settings.shutdown_timeout_seconds + 10)
            nats.stop()
        return 0

    async def _start(self, child: Child, env: dict[str, str]) -> None:
        log_path = self.log_of(child)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log_file:
            child.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "cli.supervisor",
                child.service,
                env=env,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL,
                preexec_fn=_child_setup,  # setsid + pdeathsig
            )
        child.started_at = time.monotonic()

    async def _keep_running(self, child: Child, env: dict[str, str]) -> None:
        """Wait for the child to exit and start it again with backoff, until cancelled; then
        stop it."""
        try:
            while True:
                assert child.process is not None
                code = await child.process.wait()
                if time.monotonic() - child.started_at > RESTART_RESET_SECONDS:
                    child.restarts = 0
                delay = min(2**child.restarts, MAX_RESTART_DELAY)
                child.restarts += 1
                self.say(
                    f"{child.service} exited with code {code}; restarting in {delay}s "
                    f"(log: {self.log_of(child)})"
                )
                await asyncio.sleep(delay)
                await self._start(child, env)
        finally:
            await self._terminate(child)

    async def _terminate(self, child: Child) -> None:
        """SIGTERM the child's process group, wait the shutdown bound, then SIGKILL it."""
        process = child.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), self.settings.shutdown_timeout_seconds + 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 5)


def run_child(service: str) -> None:
    """Run one service in this process: what `nest up` starts, without the CLI around it."""
    from libs.common.settings import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None
    module = importlib.import_module(f"services.{service}.main")
    module.run(settings)


if __name__ == "__main__":
    run_child(sys.argv[1])
