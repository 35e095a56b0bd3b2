"""An idle engine holds its first step briefly so a burst of requests starts together."""

from __future__ import annotations

import asyncio
import threading

import pytest

from deepserve.errors import Unavailable
from deepserve.flowserve.engine.admission_window import AdmissionWindow
from deepserve.flowserve.engine.async_engine import AsyncEngine
from deepserve.flowserve.testing.fake_executor import FakeExecutor
from tests.unit.flowserve.test_engine import BS, VOCAB, collect, config, greedy


def test_the_hold_is_a_fraction_of_the_expected_prefill_capped() -> None:
    window = AdmissionWindow(fraction=0.05, max_s=0.025)
    assert window.hold_s(256, 2048) == 0.0  # no step timed yet: no estimate, no hold
    window.note_step(10, 1.0)  # too small a step to learn from
    assert window.seconds_per_token is None
    window.note_step(2048, 2.048)  # 1 ms a token
    assert window.hold_s(256, 2048) == pytest.approx(0.05 * 0.256)
    assert window.hold_s(2000, 2048) == 0.025  # capped
    assert window.hold_s(2048, 2048) == 0.0  # the step is full already: nothing to wait for
    assert window.hold_s(0, 2048) == 0.0
    window.note_step(1024, 2.048)  # 2 ms a token: the estimate moves towards it
    assert 0.001 < window.seconds_per_token < 0.002
    assert AdmissionWindow(fraction=0.0).hold_s(256, 2048) == 0.0


class _TimedExecutor(FakeExecutor):
    """Records which requests each plan holds."""

    def __init__(self) -> None:
        super().__init__(256, BS, VOCAB)
        self.requests_per_plan: list[set[str]] = []

    def submit(self, plan):  # type: ignore[no-untyped-def]
        self.requests_per_plan.append({s.request_id for s in plan.sequences})
        return super().submit(plan)


async def _burst(window_fraction: float) -> list[set[str]]:
    executor = _TimedExecutor()
    engine = AsyncEngine(
        config(
            step_token_budget=64,
            admission_window_fraction=window_fraction,
            admission_window_max_s=5.0,
        ),
        executor,
    )
    # 10 ms a token, as if learnt from earlier steps: a 12-token prompt is a 120 ms prefill.
    engine.core.admission_window.seconds_per_token = 0.01
    try:
        first = asyncio.create_task(collect(engine, "first", list(range(1, 13)), greedy(2)))
        await asyncio.sleep(0.002)  # the burst's second request, a few ms behind
        second = asyncio.create_task(collect(engine, "second", list(range(20, 32)), greedy(2)))
        await asyncio.gather(first, second)
    finally:
        engine.shutdown()
    return executor.requests_per_plan


async def test_a_request_a_few_ms_behind_joins_the_first_step() -> None:
    plans = await _burst(window_fraction=1.0)  # hold up to the whole expected prefill
    assert plans[0] == {"first", "second"}


async def test_without_the_window_the_first_arrival_runs_alone() -> None:
    # The first step must not wait for company. A 2 ms race against a second arrival (as in
    # _burst) loses on a loaded host, so the second request is left out: with an expected
    # prefill of 120 s a window would hold the step for its 5 s cap, and none may be held.
    executor = _TimedExecutor()
    engine = AsyncEngine(
        config(step_token_budget=64, admission_window_fraction=0.0, admission_window_max_s=5.0),
        executor,
    )
    engine.core.admission_window.seconds_per_token = 10.0
    try:
        await asyncio.wait_for(collect(engine, "first", list(range(1, 13)), greedy(2)), 3.0)
    finally:
        engine.shutdown()
    assert executor.requests_per_plan[0] == {"first"}


async def test_a_stop_during_the_hold_fails_what_arrived() -> None:
    executor = FakeExecutor(256, BS, VOCAB, gate=threading.Event())
    engine = AsyncEngine(config(admission_window_fraction=1.0, admission_window_max_s=30), executor)
    engine.core.admission_window.seconds_per_token = 1.0  # a 30 s hold
    task = asyncio.create_task(collect(engine, "held", [1, 2, 3], greedy(2)))
    await asyncio.sleep(0.05)
    await asyncio.wait_for(asyncio.to_thread(engine.shutdown), 10)  # not the 30 s hold
    with pytest.raises(Unavailable, match="shut down"):
        await asyncio.wait_for(task, 10)
    assert executor.plans == []
