"""Named, guarded background tasks: failures are logged at once and re-raised at shutdown.

Every long-lived loop of a service runs in a `TaskSet` (kopf's discipline): it has a name that
says what it does (`intents`, `resync`, `follow-<cluster id>`), a task that dies unexpectedly is
logged the moment it dies and its exception raised again by `stop`, and `stop` waits a bounded
time for every task before it gives up on it. A finished task leaves the set, so tasks started
per cluster or per message do not pile up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class TaskSet:
    """The long-running loops of one owner (a service, a consumer); names are unique among the
    tasks still running."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self.failures: list[BaseException] = []
        """Exceptions of tasks that died, oldest first (`stop` raises the first)."""

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Start `coro` as the task `name`; raises ValueError while a task of that name runs."""
        if self.alive(name):
            coro.close()
            raise ValueError(f"a task named {name!r} is already running")
        task = asyncio.create_task(coro, name=name)
        self._tasks[name] = task
        task.add_done_callback(self._on_done)
        return task

    def _on_done(self, task: asyncio.Task[Any]) -> None:
        if self._tasks.get(task.get_name()) is task:
            del self._tasks[task.get_name()]
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("background task %s failed", task.get_name(), exc_info=exc)
            self.failures.append(exc)

    def get(self, name: str) -> asyncio.Task[Any] | None:
        """The running task `name`, or None."""
        task = self._tasks.get(name)
        return task if task is not None and not task.done() else None

    def alive(self, name: str) -> bool:
        return self.get(name) is not None

    def names(self, prefix: str = "") -> list[str]:
        """The names of the running tasks that start with `prefix`."""
        return sorted(n for n, t in self._tasks.items() if n.startswith(prefix) and not t.done())

    def __len__(self) -> int:
        return sum(1 for task in self._tasks.values() if not task.done())

    async def cancel(self, name: str, timeout: float = 2.0) -> None:
        """Cancel the task `name` (if it runs) and wait up to `timeout` for it to end."""
        task = self.get(name)
        if task is None:
            return
        task.cancel()
        await asyncio.wait([task], timeout=timeout)

    async def wait(self, timeout: float) -> list[str]:
        """Wait up to `timeout` for every running task to end by itself (a drain); the names of
        those still running then."""
        tasks = [t for t in self._tasks.values() if not t.done()]
        if not tasks:
            return []
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        return sorted(task.get_name() for task in pending)

    async def stop(self, timeout: float) -> None:
        """Cancel every task, wait at most `timeout`, and re-raise the first failure."""
        tasks = [t for t in self._tasks.values() if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                log.warning("task %s did not stop within %.1fs", task.get_name(), timeout)
        for task in tasks:
            if task.done() and not task.cancelled():
                with contextlib.suppress(BaseException):
                    task.result()
        self._tasks.clear()
        if self.failures:
            raise self.failures[0]
