"""The model runner against transformers' greedy generate, driven like the engine drives it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepserve.errors import InvalidArgument
from deepserve.flowserve.engine.step_plan import StepPlan, StepSequence
from deepserve.flowserve.runner.inputs import build_model_inputs
from deepserve.flowserve.runner.model_runner import ModelRunner
from tests.unit.flowserve.runner.greedy_driver import GreedyDriver
from tests.unit.flowserve.runner.tiny_models import PROMPTS, hf_greedy, save_tiny_model

NEW_TOKENS = 32
NUM_BLOCKS = 96
BLOCK_SIZE = 4


def _runner(model_dir: Path) -> ModelRunner:
    return ModelRunner(model_dir, "cpu", torch.float32, NUM_BLOCKS, BLOCK_SIZE)


def _generate(
    model_dir: Path, prompts: list[list[int]], chunk_size: int | None = None
) -> list[list[int]]:
    driver = GreedyDriver(_runner(model_dir).execute, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)
    return driver.generate(prompts, NEW_TOKENS, chunk_size)


@pytest.fixture(scope="module")
def llama_reference(llama_dir: Path) -> list[list[int]]:
    return hf_greedy(llama_dir, PROMPTS, NEW_TOKENS)


@pytest.mark.parametrize("chunk_size", [None, 3], ids=["whole-prefill", "chunks-of-3"])
def test_batched_greedy_matches_transformers(
    llama_dir: Path, llama_reference: list[list[int]], chunk_size: int | None
) -> None:
    assert _generate(llama_dir, PROMPTS, chunk_size) == llama_reference


def test_each_prompt_alone_matches_batched(
    llama_dir: Path, llama_reference: list[list[int]]
) -> None:
    for prompt, expected in zip(PROMPTS, llama_reference, strict=True):
        assert _generate(llama_dir, [prompt]) == [expected]
        assert _generate(llama_dir, [prompt], chunk_size=3) == [expected]


@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("llama", {"tie_word_embeddings": True}),
        ("qwen2", {}),
        (
            "llama",
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                }
            },
        ),
        ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
        ("llama", {"head_dim": 32}),  # explicit head_dim != hidden / heads
    ],
    ids=["tied", "qwen2-bias", "rope-llama3", "rope-linear", "head-dim-32"],
)
def test_model_variants_match_transformers(
    tmp_path: Path, family: str, overrides: dict[str, object]
) -> None:
    model_dir = save_tiny_model(tmp_path, family=family, seed=1, **overrides)
    prompts = PROMPTS[:3]
    assert _generate(model_dir, prompts, chunk_size=3) == hf_greedy(model_dir, prompts, NEW_TOKENS)


def test_logits_rows_follow_plan_order_and_needs_logits(llama_dir: Path) -> None:
    runner = _runner(llama_dir)
    # PROMPTS[0] has 7 tokens (2 blocks of 4), PROMPTS[2] 13 (4 blocks).
    alone = [
        _runner(llama_dir).execute(StepPlan(0, [StepSequence("x", prompt, 0, table)]))
        for prompt, table in ((PROMPTS[0], [60, 61]), (PROMPTS[2], [62, 63, 64, 65]))
    ]
    plan = StepPlan(
        0,
        [
            StepSequence("a", PROMPTS[0], 0, [1, 2]),
            StepSequence("b", PROMPTS[1], 0, [3], needs_logits=False),
            StepSequence("c", PROMPTS[2][:8], 0, [4, 5]),
            StepSequence("d", [9], 0, [8]),
        ],
    )
    logits = runner.execute(plan)
    assert logits.shape == (3, 256) and logits.dtype == torch.float32
    assert torch.allclose(logits[0], alone[0][0], atol=1e-5)
    rest = StepPlan(1, [StepSequence("c", PROMPTS[2][8:], 8, [4, 5, 6, 7])])
    assert torch.allclose(runner.execute(rest)[0], alone[1][0], atol=1e-5)


def test_kv_survives_host_round_trip_into_other_blocks(llama_dir: Path) -> None:
    runner = _runner(llama_dir)
    prompt = PROMPTS[0]  # 7 tokens -> 2 blocks
    logits = runner.execute(StepPlan(0, [StepSequence("a", prompt, 0, [3, 7])]))
    token = int(logits.argmax())
    expected = runner.execute(StepPlan(1, [StepSequence("a", [token], 7, [3, 7])]))
    host = runner.copy_to_host([3, 7])
    assert host.device.type == "cpu" and host.shape == (2, 2, 2, BLOCK_SIZE, 2, 16)
    fresh = _runner(llama_dir)
    fresh.load_from_host([50, 51], host)
    moved = fresh.execute(StepPlan(0, [StepSequence("a", [token], 7, [50, 51])]))
    assert torch.equal(moved, expected)


def test_empty_plan_returns_no_logits(llama_dir: Path) -> None:
    runner = _runner(llama_dir)
    assert runner.execute(StepPlan(0)).shape == (0, 256)


@pytest.mark.parametrize(
    ("sequence", "field"),
    [
        (StepSequence("a", [1, 2, 3, 4, 5], 0, [0]), "block_table"),
        (StepSequence("a", [1], 0, [NUM_BLOCKS]), "block_table"),
        (StepSequence("a", [], 0, [0]), "token_ids"),
        (StepSequence("a", [1], -1, [0]), "start_pos"),
    ],
)
def test_bad_plans_raise_invalid_argument(
    llama_dir: Path, sequence: StepSequence, field: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        _runner(llama_dir).execute(StepPlan(0, [sequence]))
    assert info.value.field == field


def test_bfloat16_runner_returns_float32_logits_close_to_float32(llama_dir: Path) -> None:
    plan = StepPlan(0, [StepSequence("a", PROMPTS[2], 0, [0, 1, 2, 3])])
    full = _runner(llama_dir).execute(plan)
    half = ModelRunner(llama_dir, "cpu", "bfloat16", NUM_BLOCKS, BLOCK_SIZE).execute(plan)
    assert half.dtype == torch.float32
    assert torch.cosine_similarity(full, half, dim=-1).item() > 0.99


def test_bucketed_prefill_rows_change_nothing_but_the_matmul_shapes(llama_dir: Path) -> None:
    """Padding a prefill step's rows to a bucket (bounding oneDNN's per-row-count builds) keeps
    every logit, and the padding rows write no KV: the next step reads the same cache."""
    # bfloat16 on oneDNN buckets its rows; where oneDNN has no bfloat16 matmul (AVX2-only CPUs)
    # F.linear serves and nothing is padded.
    bucketed = ModelRunner(llama_dir, "cpu", "bfloat16", NUM_BLOCKS, BLOCK_SIZE).model.row_bucket
    assert bool(bucketed) == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    first = StepPlan(
        0,
        [
            StepSequence("a", PROMPTS[0], 0, [1, 2]),
            StepSequence("c", PROMPTS[2], 0, [4, 5, 6, 7]),
            StepSequence("b", PROMPTS[1], 0, [3]),
        ],
    )  # 22 tokens
    second = StepPlan(
        1, [StepSequence("a", [11], 7, [1, 2]), StepSequence("c", [12], 13, [4, 5, 6, 7])]
    )
    results = []
    for bucket in (0, 8):
        runner = _runner(llama_dir)
        runner.model.row_bucket = bucket
        meta = build_model_inputs(
            first,
            block_size=BLOCK_SIZE,
            device=torch.device("cpu"),
            fused_prefill=runner.model.fused_prefill,
        ).attention
        padded_to = runner.model._padded_rows(first.num_tokens, meta, None)
        results.append((padded_to, runner.execute(first), runner.execute(second)))
    (exact_rows, exact_first, exact_second), (rows, bucketed_first, bucketed_second) = results
    assert (exact_rows, rows) == (22, 24)
    torch.testing.assert_close(bucketed_first, exact_first, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bucketed_second, exact_second, atol=1e-5, rtol=1e-5)
