"""Stopping background loops: shutdown ends even when a loop swallows its cancellation."""

from __future__ import annotations

import asyncio
import logging

import pytest

from deepserve.background import stop_task, stop_tasks


async def _loop_that_swallows_cancels(times: int, passes: list[int]) -> None:
    # What Python 3.11's wait_for does to a cancel that lands as its inner call completes.
    swallowed = 0
    while True:
        passes.append(1)
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            if swallowed == times:
                raise
            swallowed += 1


async def test_a_loop_that_swallows_the_first_cancels_still_ends() -> None:
    passes: list[int] = []
    task = asyncio.create_task(_loop_that_swallows_cancels(2, passes))
    await asyncio.sleep(0.02)
    # One cancel leaves it running: what the old stop awaited forever.
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done()
    await asyncio.wait_for(stop_task(task, retry_s=0.05), timeout=5)
    assert task.cancelled()


async def test_a_failure_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    async def fails() -> None:
        raise RuntimeError("the loop broke")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="deepserve.background"):
        await stop_task(task)
    assert "the loop broke" in caplog.text


async def test_none_and_finished_tasks_are_fine() -> None:
    await stop_task(None)

    async def done() -> None:
        return None

    task = asyncio.create_task(done())
    await task
    await stop_task(task)
    assert task.done() and not task.cancelled()


async def test_stop_tasks_ends_every_one() -> None:
    passes: list[int] = []
    tasks = [asyncio.create_task(_loop_that_swallows_cancels(i, passes)) for i in range(3)]
    await asyncio.sleep(0.02)
    await asyncio.wait_for(stop_tasks(tasks, retry_s=0.05), timeout=5)
    assert all(t.cancelled() for t in tasks)
