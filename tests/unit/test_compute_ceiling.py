"""bench.compute_ceiling counts a workload's FLOPs the way torch counts a real model's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.compute_ceiling import DecoderShape, ceiling_tok_s, request_flops, workload_flops
from bench.serve_vs_vllm import parse_args, workload_ceilings, workload_requests
from tests.tiny_model import make_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("ceiling") / "tiny")


def _counted(model: torch.nn.Module, ids: torch.Tensor, **kwargs: object) -> tuple[int, int]:
    """(projection FLOPs, attention FLOPs) torch counts for one forward of the eager model:
    its projections are `mm`s, its attention batched `bmm`s."""
    with FlopCounterMode(display=False) as counter:
        model(ids, **kwargs)
    flops = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert set(flops) == {"aten.mm", "aten.bmm"}
    return flops["aten.mm"], flops["aten.bmm"]


def test_a_prompt_pass_matches_torchs_count_of_the_real_model(tiny: Path) -> None:
    from transformers import AutoModelForCausalLM

    shape = DecoderShape.of(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny, attn_implementation="eager").eval()
    n = 24
    ids = torch.arange(3, 3 + n).unsqueeze(0)
    with torch.inference_mode():
        matmuls, attention = _counted(model, ids, logits_to_keep=1)
    # The LM head at the last position only: a prompt of n tokens yields one output token.
    assert matmuls == n * shape.layer_flops_per_token() + shape.head_flops()
    # Eager attention multiplies the full n x n scores; a causal pass needs the lower triangle.
    causal = sum(shape.attention_flops(p) for p in range(1, n + 1))
    assert attention == shape.attention_flops(n) * n
    assert causal == attention * (n + 1) // (2 * n)
    assert request_flops(shape, n, 1) == matmuls + causal


def test_each_further_output_token_is_one_pass_with_its_lm_head(tiny: Path) -> None:
    shape = DecoderShape.of(tiny)
    one = request_flops(shape, 10, 1)
    three = request_flops(shape, 10, 3)
    per_token = shape.layer_flops_per_token() + shape.head_flops()
    assert three - one == 2 * per_token + shape.attention_flops(11) + shape.attention_flops(12)


def test_the_ceiling_is_output_tokens_at_the_rate() -> None:
    assert ceiling_tok_s(flops=4_000, output_tokens=10, rate_flops_s=2_000.0) == 5.0


def test_the_workloads_requests_are_what_the_bench_sends(tiny: Path) -> None:
    args = parse_args(["--quick", "--rounds", "2"])
    c32 = workload_requests("bench-c32", 0, args, 256)
    assert c32 == [(256, 64)] * 32
    mixed = [workload_requests("mixed", r, args, 256) for r in range(2)]
    assert mixed[0] is not None and mixed[1] is not None
    assert len(mixed[0]) == 16 and mixed[0] != mixed[1]  # each round draws its own prompts
    assert all(16 <= p <= 384 and 16 <= o <= 64 for p, o in mixed[0])
    assert workload_requests("prefix-chat", 0, args, 256) is None
    shape = DecoderShape.of(tiny)
    ceilings = workload_ceilings(args, shape, 256, rate=1e9)
    assert set(ceilings) == {"mixed", "bench-c8", "bench-c32"}
    flops, tokens = workload_flops(shape, c32)
    assert ceilings["bench-c32"] == [tokens * 1e9 / flops] * 2


def test_the_report_gives_each_systems_share_and_the_goals_share() -> None:
    from bench.serve_vs_vllm import SystemRun, ceiling_report

    def figures(tok_s: float) -> dict[str, float]:
        return {"output_tok_s": tok_s, "ttft_p50_ms": 1.0, "tpot_p50_ms": 1.0, "wall_s": 1.0}

    ours, theirs = SystemRun("deepserve", 1.0), SystemRun("vllm-pinned", 1.0)
    for mine, other in ((80.0, 70.0), (40.0, 35.0)):  # the second round ran on a slow spell
        ours.add("bench-c32", figures(mine))
        theirs.add("bench-c32", figures(other))
    text = ceiling_report([ours, theirs], {"bench-c32": [100.0, 50.0]}, rate=2e11)
    row = next(line for line in text.splitlines() if line.startswith("| bench-c32"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # Shares pair each round with its own ceiling; 1.3 x 70% = 91% of the ceiling.
    assert cells == ["bench-c32", "75", "80%", "70%", "91%"]
    assert "200 GFLOP/s" in text
