"""Where a served run's time goes, from a pod's step log (DEEPSERVE_FLOWSERVE_STEP_TRACE_PATH).

Splits the forward thread's time into steps that carry prompt tokens, steps of decode rows only,
and the gaps between steps, when the forward thread waits for the engine to plan the next one.
Comparing a served run's log with an in-process run's (same workload) shows whether what runs
beside the engine (gRPC, the gateway, the client) slows the steps themselves or the time
between them.

    python -m bench.step_trace LOG [LOG ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from deepserve.flowserve.runner.step_trace import StepRecord


@dataclass(frozen=True, slots=True)
class StepSummary:
    span_s: float  # first step's start to last step's end
    prefill_steps: int  # steps with any prompt tokens
    prefill_s: float
    prefill_tokens: int
    decode_steps: int
    decode_s: float
    decode_p50_ms: float
    gaps_s: float  # forward thread idle between steps


def read_records(lines: Iterable[str]) -> list[StepRecord]:
    records = [StepRecord(**json.loads(line)) for line in lines if line.strip()]
    return sorted(records, key=lambda r: r.start)


def summarize(records: list[StepRecord]) -> StepSummary:
    if not records:
        raise ValueError("no steps in the log")
    prefill = [r for r in records if not r.decode_only]
    decode = [r for r in records if r.decode_only]
    decode_ms = [(r.end - r.start) * 1e3 for r in decode]
    return StepSummary(
        span_s=records[-1].end - records[0].start,
        prefill_steps=len(prefill),
        prefill_s=sum(r.end - r.start for r in prefill),
        prefill_tokens=sum(r.tokens - r.decode_seqs for r in prefill),
        decode_steps=len(decode),
        decode_s=sum(decode_ms) / 1e3,
        decode_p50_ms=statistics.median(decode_ms) if decode_ms else 0.0,
        gaps_s=sum(max(0.0, b.start - a.end) for a, b in itertools.pairwise(records)),
    )


def summary_row(name: str, s: StepSummary) -> str:
    return (
        f"| {name} | {s.span_s:.2f} | {s.prefill_steps} | {s.prefill_tokens} | {s.prefill_s:.2f} "
        f"| {s.decode_steps} | {s.decode_p50_ms:.1f} | {s.decode_s:.2f} | {s.gaps_s:.2f} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    print(
        "| log | span s | prompt steps | prompt tok | prompt s | decode steps "
        "| decode p50 ms | decode s | gaps s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for log in args.logs:
        print(summary_row(log.name, summarize(read_records(log.read_text().splitlines()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
