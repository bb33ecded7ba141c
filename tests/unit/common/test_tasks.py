"""TaskSet: named tasks, failures logged and re-raised at shutdown, finished tasks gone."""

from __future__ import annotations

import asyncio

import pytest

from libs.common.tasks import TaskSet


async def test_a_failed_task_is_remembered_and_raised_by_stop() -> None:
    tasks = TaskSet()

    async def dies() -> None:
        raise RuntimeError("the loop broke")

    async def forever() -> None:
        await asyncio.Event().wait()

    tasks.spawn("dies", dies())
    tasks.spawn("forever", forever())
    await asyncio.sleep(0.05)
    assert not tasks.alive("dies")
    assert tasks.alive("forever")
    assert [str(exc) for exc in tasks.failures] == ["the loop broke"]
    with pytest.raises(RuntimeError, match="the loop broke"):
        await tasks.stop(1.0)
    assert len(tasks) == 0


async def test_finished_tasks_leave_and_a_name_runs_once_at_a_time() -> None:
    tasks = TaskSet()
    release = asyncio.Event()

    async def follow() -> None:
        await release.wait()

    tasks.spawn("follow-a", follow())
    tasks.spawn("follow-b", follow())
    with pytest.raises(ValueError, match="already running"):
        tasks.spawn("follow-a", follow())
    assert tasks.names("follow-") == ["follow-a", "follow-b"]
    release.set()
    assert await tasks.wait(1.0) == []
    assert tasks.names() == []
    tasks.spawn("follow-a", follow())  # the name is free again
    await tasks.stop(1.0)


async def test_cancel_one_and_wait_reports_what_is_still_running() -> None:
    tasks = TaskSet()

    async def forever() -> None:
        await asyncio.Event().wait()

    tasks.spawn("one", forever())
    tasks.spawn("two", forever())
    await tasks.cancel("one")
    assert tasks.names() == ["two"]
    assert await tasks.wait(0.05) == ["two"]
    await tasks.stop(1.0)
    assert tasks.failures == []
