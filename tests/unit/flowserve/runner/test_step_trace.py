"""The forward-pass step log: written by a real executor, summed by bench.step_trace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.step_trace import main, read_records, summarize
from deepserve.flowserve.engine.step_plan import StepPlan, StepSequence
from deepserve.flowserve.runner.executor import MultiprocExecutor, UniprocExecutor
from deepserve.flowserve.runner.step_trace import StepRecord
from tests.unit.flowserve.runner.tiny_models import PROMPTS

NUM_BLOCKS = 32
BLOCK_SIZE = 4


def test_executor_logs_each_step_it_runs_and_results_are_unchanged(
    llama_dir: Path, tmp_path: Path
) -> None:
    log = tmp_path / "trace" / "steps.jsonl"
    prompt = PROMPTS[0]
    blocks = [3, 4, 5, 6]
    prefill = StepPlan(0, [StepSequence("a", prompt, 0, blocks)])
    decode = StepPlan(1, [StepSequence("a", [7], len(prompt), blocks)])
    with (
        UniprocExecutor(
            llama_dir, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, step_trace_path=log
        ) as traced,
        UniprocExecutor(llama_dir, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE) as plain,
    ):
        got = [traced.execute(prefill), traced.execute(decode)]
        want = [plain.execute(prefill), plain.execute(decode)]
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(x["tokens"], x["seqs"], x["decode_seqs"]) for x in lines] == [
        (len(prompt), 1, 0),
        (1, 1, 1),
    ]
    assert lines[0]["start"] < lines[0]["end"] <= lines[1]["start"] < lines[1]["end"]


def test_executor_runs_the_runners_execute_as_it_is_at_each_step(
    llama_dir: Path, tmp_path: Path
) -> None:
    # bench.engine times the forward pass by wrapping runner.execute on a built engine.
    plan = StepPlan(0, [StepSequence("a", PROMPTS[0], 0, [1, 2, 3, 4])])
    with UniprocExecutor(
        llama_dir,
        num_blocks=NUM_BLOCKS,
        block_size=BLOCK_SIZE,
        step_trace_path=tmp_path / "steps.jsonl",
    ) as executor:
        seen: list[int] = []
        execute = executor.runner.execute

        def wrapped(p: StepPlan) -> torch.Tensor:
            seen.append(p.step_id)
            return execute(p)

        executor.runner.execute = wrapped  # type: ignore[method-assign]
        executor.execute(plan)
    assert seen == [0]
    assert len((tmp_path / "steps.jsonl").read_text().splitlines()) == 1


def test_tensor_parallel_workers_log_rank_zeros_steps(llama_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "tp2.jsonl"
    plan = StepPlan(0, [StepSequence("a", PROMPTS[1], 0, [1, 2, 3, 4])])
    with MultiprocExecutor(
        llama_dir,
        tp_size=2,
        num_blocks=NUM_BLOCKS,
        block_size=BLOCK_SIZE,
        device="cpu",
        step_trace_path=log,
    ) as executor:
        logits = executor.execute(plan)
    assert logits.shape[0] == 1
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(x["tokens"], x["seqs"]) for x in lines] == [(len(PROMPTS[1]), 1)]


def _record(start: float, end: float, tokens: int, seqs: int, decode_seqs: int) -> str:
    return json.dumps(
        {"start": start, "end": end, "tokens": tokens, "seqs": seqs, "decode_seqs": decode_seqs}
    )


def test_summary_splits_prompt_steps_decode_steps_and_gaps() -> None:
    lines = [
        _record(10.0, 10.7, 1024, 4, 0),  # four prompts
        _record(10.75, 11.45, 1028, 8, 4),  # four prompts beside four decode rows
        _record(11.5, 11.52, 8, 8, 8),
        _record(11.53, 11.56, 8, 8, 8),
        _record(11.56, 11.60, 8, 8, 8),
        "",
    ]
    # Out of order on purpose: records sort by start.
    s = summarize(read_records(reversed(lines)))
    assert s.prefill_steps == 2 and s.prefill_tokens == 2048
    assert abs(s.prefill_s - 1.4) < 1e-9
    assert s.decode_steps == 3 and abs(s.decode_s - 0.09) < 1e-9
    assert abs(s.decode_p50_ms - 30.0) < 1e-6
    assert abs(s.gaps_s - 0.11) < 1e-9
    assert abs(s.span_s - 1.6) < 1e-9
    assert StepRecord(0, 1, 1, 1, 1).decode_only and not StepRecord(0, 1, 5, 2, 1).decode_only


def test_cli_prints_one_row_per_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "served.jsonl"
    log.write_text("\n".join([_record(0, 1, 256, 1, 0), _record(1.5, 1.52, 1, 1, 1)]) + "\n")
    assert main([str(log)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| served")]
    assert rows == ["| served.jsonl | 1.52 | 1 | 256 | 1.00 | 1 | 20.0 | 0.02 | 0.50 |"]


def test_summary_of_an_empty_log_is_an_error() -> None:
    with pytest.raises(ValueError, match="no steps"):
        summarize([])
