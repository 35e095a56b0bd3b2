"""Priority admission: the waiting queue admits higher priorities first, FCFS within one."""

from __future__ import annotations

import asyncio
import threading

from deepserve.flowserve.engine.async_engine import AsyncEngine, EngineConfig, GenerationOutput
from deepserve.flowserve.engine.request import Request
from deepserve.flowserve.engine.step_planner import Scheduler, SchedulerConfig
from deepserve.flowserve.kv_cache import KVCacheManager
from deepserve.flowserve.sampling import SamplingParams
from deepserve.flowserve.testing.fake_executor import FakeExecutor

BS = 4
VOCAB = 97


def step(sched: Scheduler, executor: FakeExecutor) -> list[str]:
    """Runs one step; returns the ids it scheduled."""
    batch = sched.finalize_batch(sched.schedule())
    sched.kv_cache.flush_transfers()
    if not batch.is_empty:
        logits = executor.execute(batch)
        rows = [s.request_id for s in batch.sequences if s.needs_logits]
        sched.update_from_output(dict(zip(rows, logits.argmax(-1).tolist(), strict=True)))
    return [s.request_id for s in batch.sequences]


def admitted_order(sched: Scheduler, executor: FakeExecutor) -> list[str]:
    """Request ids in the order they first got a step."""
    order: list[str] = []
    while sched.has_unfinished_requests:
        order.extend(rid for rid in step(sched, executor) if rid not in order)
    return order


def test_higher_priority_waiting_request_is_admitted_first() -> None:
    sched = Scheduler(
        SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64), KVCacheManager(64, BS)
    )
    executor = FakeExecutor(64, BS, VOCAB)
    running = Request("running", [1, 2, 3], 4)
    sched.add_request(running)
    assert step(sched, executor) == ["running"]  # it holds the only slot
    sched.add_request(Request("batch-a", [4, 5, 6], 2, priority=-10))
    sched.add_request(Request("batch-b", [7, 8, 9], 2, priority=-10))
    sched.add_request(Request("interactive", [10, 11], 2))
    sched.add_request(Request("urgent", [12, 13], 2, priority=5))
    assert [r.request_id for r in sched.waiting] == ["urgent", "interactive", "batch-a", "batch-b"]
    order = admitted_order(sched, executor)
    # The running request is never displaced; then priority order, FCFS within a priority.
    assert order == ["running", "urgent", "interactive", "batch-a", "batch-b"]
    assert running.finish_reason == "length"


def test_preempted_request_keeps_its_priority_place() -> None:
    sched = Scheduler(
        SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), KVCacheManager(64, BS)
    )
    low = Request("low", [1, 2, 3], 2, priority=-10)
    high = Request("high", [4, 5, 6], 2)
    sched.add_request(low)
    sched.add_request(high)
    assert [r.request_id for r in sched.waiting] == ["high", "low"]


async def _first_tokens(engine: AsyncEngine, order: list[str], rid: str, prio: int) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=2)
    async for _out in engine.generate(rid, [5, 6, 7], params, priority=prio):
        if rid not in order:
            order.append(rid)


def test_engine_generate_honours_priority() -> None:
    cfg = EngineConfig(
        block_size=BS,
        num_gpu_blocks=64,
        max_num_seqs=1,
        max_num_batched_tokens=32,
        max_model_len=64,
        vocab_size=VOCAB,
    )
    engine = AsyncEngine(cfg, FakeExecutor(64, BS, VOCAB))
    gate = threading.Event()

    # Park the engine thread on a command so all three requests reach it in one inbox,
    # in arrival order: low priorities first, the interactive request last.
    def park() -> list[GenerationOutput]:
        gate.wait(30)
        return []

    with engine._wakeup:
        engine._commands.append(park)
    engine.start()
    order: list[str] = []

    async def main() -> None:
        tasks = [
            asyncio.create_task(_first_tokens(engine, order, rid, prio))
            for rid, prio in (("batch-1", -10), ("batch-2", -10), ("interactive", 0))
        ]
        for _ in range(5):
            await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(*tasks)

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
    assert order == ["interactive", "batch-1", "batch-2"]
