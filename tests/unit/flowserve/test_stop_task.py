"""Stopping a pod's background task (its load reporter) ends it even when something it awaits
swallows the cancellation, which once left an UnloadModel waiting past its 60 s deadline."""

from __future__ import annotations

import asyncio

from deepserve.flowserve.pod.shell import stop_task


async def test_a_task_that_swallows_its_cancellation_is_still_stopped() -> None:
    swallowed = 0
    in_call = asyncio.Event()

    async def reporter() -> None:
        nonlocal swallowed
        while True:
            try:
                in_call.set()
                await asyncio.sleep(0.2)  # "a Redis call" that eats the CancelledError
            except asyncio.CancelledError:
                swallowed += 1
            in_call.clear()
            await asyncio.sleep(0.3)

    task = asyncio.create_task(reporter())
    await in_call.wait()  # the first cancel lands inside the call
    # A single cancel and await would never return here; bounded so the test cannot hang.
    await asyncio.wait_for(stop_task(task, retry_s=0.05), timeout=30)
    assert task.cancelled()
    assert swallowed >= 1


async def test_a_task_that_honours_cancellation_stops_at_once() -> None:
    task = asyncio.create_task(asyncio.sleep(60))
    await asyncio.sleep(0)
    await stop_task(task)
    assert task.cancelled()
