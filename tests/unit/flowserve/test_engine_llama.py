"""End to end on a tiny random Llama: AsyncEngine + real executor and sampler vs transformers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from deepserve.flowserve.engine.async_engine import AsyncEngine, EngineConfig
from deepserve.flowserve.runner.executor import UniprocExecutor
from deepserve.sampling_params import SamplingParams
from tests.unit.flowserve.runner.tiny_models import PROMPTS, hf_greedy, save_tiny_model

MAX_NEW = 8
BS = 4
# A longer prompt sharing a 12-token prefix with PROMPTS[2], so the second run hits the cache.
LONG = [*PROMPTS[2][:12], 9, 8, 7, 6, 5, 4, 3]
ALL_PROMPTS = [*PROMPTS, LONG]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def expected(model_dir: Path) -> list[list[int]]:
    return hf_greedy(model_dir, ALL_PROMPTS, MAX_NEW)


def params() -> SamplingParams:
    # transformers' reference forces exactly MAX_NEW tokens, so EOS must not stop us either.
    return SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)


async def generate_all(engine: AsyncEngine, tag: str) -> list[tuple[list[int], int]]:
    async def one(i: int, prompt: list[int]) -> tuple[list[int], int]:
        tokens: list[int] = []
        cached = 0
        async for out in engine.generate(f"{tag}-{i}", prompt, params()):
            tokens.extend(out.new_token_ids)
            cached = out.num_cached_tokens
        return tokens, cached

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(ALL_PROMPTS))))


def make_engine(
    model_dir: Path, num_blocks: int, *, async_scheduling: bool, chain_steps: bool = True
) -> AsyncEngine:
    executor = UniprocExecutor(
        model_dir, num_blocks=num_blocks, block_size=BS, device="cpu", dtype=torch.float32
    )
    config = EngineConfig(
        block_size=BS,
        num_gpu_blocks=num_blocks,
        max_num_seqs=4,
        step_token_budget=10,
        max_model_len=64,
        async_scheduling=async_scheduling,
        chain_steps=chain_steps,
    )
    return AsyncEngine.from_executor(config, executor)


async def test_greedy_tokens_match_transformers_with_and_without_prefix_hits(
    model_dir: Path, expected: list[list[int]]
) -> None:
    engine = make_engine(model_dir, 64, async_scheduling=True)
    try:
        cold = await generate_all(engine, "cold")
        assert [tokens for tokens, _ in cold] == expected
        warm = await generate_all(engine, "warm")  # same prompts: prefix-cache hits
        assert [tokens for tokens, _ in warm] == expected
        assert sum(cached for _, cached in warm) > 0
        assert engine.stats().prefix_cache_hit_rate > 0
    finally:
        engine.shutdown()


@pytest.mark.parametrize("async_scheduling", [True, False])
async def test_tiny_kv_budget_preempts_and_stays_correct(
    model_dir: Path, expected: list[list[int]], async_scheduling: bool
) -> None:
    # 11 blocks (44 slots) for ~90 tokens of KV at full concurrency: preemption must happen.
    engine = make_engine(model_dir, 11, async_scheduling=async_scheduling)
    try:
        results = await generate_all(engine, "tight")
        assert [tokens for tokens, _ in results] == expected
        assert engine.stats().num_preemptions > 0
        assert engine.stats().kv_blocks_used == 0
    finally:
        engine.shutdown()


@pytest.mark.parametrize("chain_steps", [True, False])
async def test_decode_steps_are_chained_on_the_real_executor(
    model_dir: Path, expected: list[list[int]], chain_steps: bool
) -> None:
    # The forward thread samples each step and feeds the step queued behind it: same tokens.
    engine = make_engine(model_dir, 64, async_scheduling=True, chain_steps=chain_steps)
    runner = engine.core.executor.runner  # type: ignore[attr-defined]
    execute = runner.execute
    fed_by: list[int | None] = []

    def recording(plan):  # type: ignore[no-untyped-def]
        fed_by.append(plan.fed_by_step)
        return execute(plan)

    runner.execute = recording
    try:
        results = await generate_all(engine, "chain")
        assert [tokens for tokens, _ in results] == expected
        assert any(step is not None for step in fed_by) is chain_steps
    finally:
        engine.shutdown()
