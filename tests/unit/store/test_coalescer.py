"""Group commit: concurrent submits share a flush, later ones wait for the next, errors reach
every caller of the failed flush."""

from __future__ import annotations

import asyncio

import pytest

from deepserve.store.coalescer import Coalescer


async def test_concurrent_items_share_one_flush_and_get_their_own_results() -> None:
    batches: list[list[int]] = []
    release = asyncio.Event()

    async def flush(items: list[int]) -> list[int]:
        batches.append(items)
        await release.wait()
        return [i * 10 for i in items]

    coalescer: Coalescer[int, int] = Coalescer(flush)
    first = asyncio.create_task(coalescer.submit(1))
    await asyncio.sleep(0)  # the first flush starts with item 1 alone
    rest = [asyncio.create_task(coalescer.submit(i)) for i in (2, 3, 4)]
    await asyncio.sleep(0)
    release.set()
    assert await first == 10
    assert [await t for t in rest] == [20, 30, 40]
    assert batches == [[1], [2, 3, 4]]  # queued during a flush: one next flush, in order
    assert coalescer.flushes == 2


async def test_a_failed_flush_fails_its_callers_and_the_next_flush_still_runs() -> None:
    async def flush(items: list[str]) -> list[str]:
        if "bad" in items:
            raise ValueError("store refused")
        return items

    coalescer: Coalescer[str, str] = Coalescer(flush)
    results = await asyncio.gather(
        coalescer.submit("bad"), coalescer.submit("ok"), return_exceptions=True
    )
    assert all(isinstance(r, ValueError) for r in results)
    assert await coalescer.submit("fine") == "fine"


async def test_a_flush_must_return_one_result_per_item() -> None:
    async def flush(items: list[int]) -> list[int]:
        return []

    coalescer: Coalescer[int, int] = Coalescer(flush)
    with pytest.raises(ValueError):
        await coalescer.submit(1)
