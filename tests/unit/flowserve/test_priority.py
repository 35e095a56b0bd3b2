"""Priority admission: the waiting queue admits higher priorities first, FCFS within one."""

from __future__ import annotations

import asyncio
import threading

from deepserve.flowserve.engine.async_engine import AsyncEngine, EngineConfig, GenerationOutput
from deepserve.flowserve.engine.request import Request
from deepserve.flowserve.engine.step_planner import StepPlanner, StepPlannerConfig
from deepserve.flowserve.kv_cache import KVCacheManager
from deepserve.flowserve.testing.fake_executor import FakeExecutor
from deepserve.sampling_params import SamplingParams

BS = 4
VOCAB = 97


def step(planner: StepPlanner, executor: FakeExecutor) -> list[str]:
    """Runs one step; returns the ids it planned."""
    plan = planner.finalize_plan(planner.plan_step())
    planner.kv_cache.flush_transfers()
    if not plan.is_empty:
        logits = executor.execute(plan)
        rows = [s.request_id for s in plan.sequences if s.needs_logits]
        planner.update_from_output(dict(zip(rows, logits.argmax(-1).tolist(), strict=True)))
    return [s.request_id for s in plan.sequences]


def admitted_order(planner: StepPlanner, executor: FakeExecutor) -> list[str]:
    """Request ids in the order they first got a step."""
    order: list[str] = []
    while planner.has_unfinished_requests:
        order.extend(rid for rid in step(planner, executor) if rid not in order)
    return order


def test_higher_priority_waiting_request_is_admitted_first() -> None:
    planner = StepPlanner(
        StepPlannerConfig(max_num_seqs=1, step_token_budget=64), KVCacheManager(64, BS)
    )
    executor = FakeExecutor(64, BS, VOCAB)
    running = Request("running", [1, 2, 3], 4)
    planner.add_request(running)
    assert step(planner, executor) == ["running"]  # it holds the only slot
    planner.add_request(Request("batch-a", [4, 5, 6], 2, priority=-10))
    planner.add_request(Request("batch-b", [7, 8, 9], 2, priority=-10))
    planner.add_request(Request("interactive", [10, 11], 2))
    planner.add_request(Request("urgent", [12, 13], 2, priority=5))
    assert [r.request_id for r in planner.waiting] == [
        "urgent",
        "interactive",
        "batch-a",
        "batch-b",
    ]
    order = admitted_order(planner, executor)
    # The running request is never displaced; then priority order, FCFS within a priority.
    assert order == ["running", "urgent", "interactive", "batch-a", "batch-b"]
    assert running.finish_reason == "length"


def test_preempted_request_keeps_its_priority_place() -> None:
    planner = StepPlanner(
        StepPlannerConfig(max_num_seqs=4, step_token_budget=64), KVCacheManager(64, BS)
    )
    low = Request("low", [1, 2, 3], 2, priority=-10)
    high = Request("high", [4, 5, 6], 2)
    planner.add_request(low)
    planner.add_request(high)
    assert [r.request_id for r in planner.waiting] == ["high", "low"]


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
        step_token_budget=32,
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
