"""A timing log of the forward pass, one JSON line per step, for finding where a step's time goes.

The served path and an in-process run differ in what runs beside the forward pass (gRPC, the
gateway, the client), and only the forward thread knows when a step really starts and ends: the
engine sees a pipelined step's end only when it next looks. `python -m bench.step_trace FILE`
sums a log into prefill time, decode step times and the gaps between steps.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from deepserve.flowserve.engine.step_plan import StepPlan

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One line of the log. Seconds on the monotonic clock: only differences within one file
    mean anything."""

    start: float
    end: float
    tokens: int
    seqs: int
    # Rows of one token after a cached context (a one-token prompt chunk counts too; it costs
    # the same).
    decode_seqs: int

    @property
    def decode_only(self) -> bool:
        return self.decode_seqs == self.seqs

    @staticmethod
    def of(plan: StepPlan, started_s: float, ended_s: float) -> StepRecord:
        return StepRecord(
            start=round(started_s, 6),
            end=round(ended_s, 6),
            tokens=plan.num_tokens,
            seqs=len(plan.sequences),
            decode_seqs=sum(1 for s in plan.sequences if len(s.token_ids) == 1 and s.start_pos > 0),
        )


class StepTrace:
    """Appends a StepRecord per step to a file. One thread writes it: the one running steps."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Line-buffered: each step's line is on disk when the step returns.
        self._out = self.path.open("a", buffering=1)

    def run(self, execute: Callable[[StepPlan], T], plan: StepPlan) -> T:
        """execute(plan), recorded when it returns."""
        started = time.perf_counter()
        result = execute(plan)
        record = StepRecord.of(plan, started, time.perf_counter())
        self._out.write(json.dumps(dataclasses.asdict(record)) + "\n")
        return result

    def close(self) -> None:
        self._out.close()


def step_trace_at(path: str | Path | None) -> StepTrace | None:
    """The log at `path`, or None when no path is set."""
    return StepTrace(path) if path else None


def run_step(trace: StepTrace | None, execute: Callable[[StepPlan], T], plan: StepPlan) -> T:
    """execute(plan), through the log when there is one."""
    return execute(plan) if trace is None else trace.run(execute, plan)
