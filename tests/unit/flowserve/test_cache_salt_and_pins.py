"""Prefix-cache isolation by salt, and explicit context pins, on the engine (fake executor)."""

from __future__ import annotations

import time

from deepserve.flowserve.engine.async_engine import AsyncEngine, EngineConfig
from deepserve.flowserve.testing.fake_executor import FakeExecutor
from deepserve.sampling_params import SamplingParams

BS = 4
PROMPT = list(range(1, 30))  # 29 tokens: 7 full blocks


def engine(num_blocks: int = 64) -> AsyncEngine:
    config = EngineConfig(
        block_size=BS, num_gpu_blocks=num_blocks, max_num_seqs=4, max_model_len=128, vocab_size=97
    )
    return AsyncEngine(config, FakeExecutor(num_blocks, BS, 97))


async def cached_tokens(e: AsyncEngine, rid: str, prompt: list[int], salt: str) -> int:
    cached = -1
    params = SamplingParams(temperature=0.0, max_tokens=2)
    async for out in e.generate(rid, prompt, params, cache_salt=salt):
        cached = out.num_cached_tokens
    return cached


async def test_two_salts_never_share_blocks_and_one_salt_does() -> None:
    e = engine()
    try:
        assert await cached_tokens(e, "a1", PROMPT, "tenant:a") == 0
        assert await cached_tokens(e, "b1", PROMPT, "tenant:b") == 0  # same tokens, other tenant
        assert await cached_tokens(e, "a2", PROMPT, "tenant:a") == (len(PROMPT) - 1) // BS * BS
        assert await cached_tokens(e, "s1", PROMPT, "shared:team") == 0
        assert await cached_tokens(e, "s2", PROMPT, "shared:team") == 28
        assert await cached_tokens(e, "u1", PROMPT, "") == 0  # the unsalted chain is its own
    finally:
        e.shutdown()


async def test_a_pinned_context_survives_pressure_and_lapses_at_its_expiry() -> None:
    e = engine(num_blocks=16)
    try:
        pinned, cached = await e.pin_context("ctx", PROMPT, salt="t", expires_at=time.time() + 60)
        assert (pinned, cached) == (28, 0)
        assert [p.context_id for p in await e.pinned_contexts()] == ["ctx"]
        # Other prompts need every unpinned block: without the pin the context would be evicted.
        for i in range(6):
            other = [40 + i, *range(60, 80)]
            await cached_tokens(e, f"o{i}", other, "t")
        assert await cached_tokens(e, "again", [*PROMPT, 90], "t") == 28
        assert await e.unpin_expired(time.time() + 120) == ["ctx"]
        assert await e.pinned_contexts() == []
        # Pinning what is cached computes nothing more.
        pinned, cached = await e.pin_context("ctx2", PROMPT, salt="t")
        assert pinned == 28 and cached == 28
        assert await e.unpin_context("ctx2") and not await e.unpin_context("ctx2")
    finally:
        e.shutdown()
