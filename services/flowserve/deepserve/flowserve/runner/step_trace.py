"""A timing log of the forward pass, one JSON line per step, for finding where a step's time goes.

The served path and an in-process run differ in what runs beside the forward pass (gRPC, the
gateway, the client), and only the forward thread knows when a step really starts and ends: the
engine sees a pipelined step's end only when it next looks. `python -m bench.step_trace FILE`
sums a log into prefill time, decode step times and the gaps between steps.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from deepserve.flowserve.engine.step_plan import StepPlan

T = TypeVar("T")


class StepTrace:
    """Appends {"start", "end", "tokens", "seqs", "decode_seqs"} per step to a file (seconds on
    the monotonic clock: only differences within one file mean anything)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def record(self, started_s: float, ended_s: float, plan: StepPlan) -> None:
        line = json.dumps(
            {
                "start": round(started_s, 6),
                "end": round(ended_s, 6),
                "tokens": plan.num_tokens,
                "seqs": len(plan.sequences),
                # One token after a cached context: a decode row (a one-token prompt chunk
                # counts too; it costs the same).
                "decode_seqs": sum(
                    1 for s in plan.sequences if len(s.token_ids) == 1 and s.start_pos > 0
                ),
            }
        )
        with self._lock, self.path.open("a") as out:
            out.write(line + "\n")

    def run(self, execute: Callable[[StepPlan], T], plan: StepPlan) -> T:
        """execute(plan), recorded when it returns."""
        started = time.perf_counter()
        result = execute(plan)
        self.record(started, time.perf_counter(), plan)
        return result
