"""Multi-LoRA in the engine, on a tiny random Llama: batched LoRA vs peft's merged model."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from deepserve.adapters.peft_format import BaseShape
from deepserve.errors import InvalidArgument
from deepserve.flowserve.engine.async_engine import AsyncEngine, EngineConfig
from deepserve.flowserve.lora import host_cache
from deepserve.flowserve.lora.host_cache import AdapterHostCache
from deepserve.flowserve.runner.executor import UniprocExecutor
from deepserve.sampling_params import SamplingParams
from tests.lora_adapters import make_peft_adapter, peft_merged_greedy
from tests.unit.flowserve.runner.tiny_models import PROMPTS, save_tiny_model

MAX_NEW = 8
BS = 4
MAX_RANK = 8
# (rank, seed, targets): full-rank and low-rank adapters, one on attention only.
ADAPTERS = [
    (8, 1, None),
    (4, 2, None),
    (8, 3, ["q_proj", "v_proj"]),
    (2, 4, ["gate_proj", "up_proj", "down_proj", "o_proj"]),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def adapter_dirs(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [
        make_peft_adapter(model_dir, root / f"a{i}", rank=r, alpha=2 * r, seed=s, targets=t)
        for i, (r, s, t) in enumerate(ADAPTERS)
    ]


@pytest.fixture(scope="module")
def expected(model_dir: Path, adapter_dirs: list[Path]) -> dict[str, list[list[int]]]:
    refs = {"": peft_merged_greedy(model_dir, None, PROMPTS, MAX_NEW)}
    for i, path in enumerate(adapter_dirs):
        refs[f"t/a{i}"] = peft_merged_greedy(model_dir, path, PROMPTS, MAX_NEW)
    return refs


def make_engine(model_dir: Path, *, slots: int = 4, max_loras: int = 4) -> AsyncEngine:
    executor = UniprocExecutor(
        model_dir, num_blocks=96, block_size=BS, device="cpu", dtype=torch.float32
    )
    config = EngineConfig(
        block_size=BS,
        num_gpu_blocks=96,
        max_num_seqs=16,
        step_token_budget=32,
        max_model_len=64,
        lora_slots=slots,
        max_loras=max_loras,
        max_lora_rank=MAX_RANK,
    )
    cache = AdapterHostCache(
        BaseShape.from_config_json(model_dir), capacity=2, max_rank=MAX_RANK, dtype=torch.float32
    )
    return AsyncEngine.from_executor(config, executor, adapter_cache=cache)


def params(max_tokens: int = MAX_NEW) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


async def run(
    engine: AsyncEngine, rid: str, prompt: list[int], adapter: str = "", path: str = ""
) -> tuple[list[int], int]:
    tokens: list[int] = []
    cached = 0
    async for out in engine.generate(rid, prompt, params(), adapter=adapter, adapter_path=path):
        tokens.extend(out.new_token_ids)
        cached = out.num_cached_tokens
    return tokens, cached


def jobs(adapter_dirs: list[Path]) -> list[tuple[str, str]]:
    return [("", "")] + [(f"t/a{i}", str(p)) for i, p in enumerate(adapter_dirs)]


async def test_each_adapter_alone_matches_peft_merged(
    model_dir: Path, adapter_dirs: list[Path], expected: dict[str, list[list[int]]]
) -> None:
    engine = make_engine(model_dir)
    try:
        for adapter, path in jobs(adapter_dirs):
            for p_index, prompt in enumerate(PROMPTS):
                tokens, _ = await run(engine, f"{adapter}-{p_index}", prompt, adapter, path)
                assert tokens == expected[adapter][p_index], (adapter, p_index)
        # The adapters really change the output (else the test would prove nothing).
        assert all(expected[f"t/a{i}"] != expected[""] for i in range(len(adapter_dirs)))
    finally:
        engine.shutdown()


async def test_mixed_batch_gives_each_request_its_tokens_alone(
    model_dir: Path, adapter_dirs: list[Path], expected: dict[str, list[list[int]]]
) -> None:
    """Base plus 4 adapters over every prompt, all at once in one batch."""
    engine = make_engine(model_dir)
    try:
        work = [
            (adapter, path, p_index)
            for adapter, path in jobs(adapter_dirs)
            for p_index in range(len(PROMPTS))
        ]
        results = await asyncio.gather(
            *(
                run(engine, f"mix-{adapter}-{p}", PROMPTS[p], adapter, path)
                for adapter, path, p in work
            )
        )
        for (adapter, _, p), (tokens, _) in zip(work, results, strict=True):
            assert tokens == expected[adapter][p], (adapter, p)
    finally:
        engine.shutdown()


async def test_slots_evict_least_recently_used_and_host_tier_reloads(
    model_dir: Path, adapter_dirs: list[Path], expected: dict[str, list[list[int]]]
) -> None:
    """Two device slots and a host tier of two for four adapters, all requested at once."""
    engine = make_engine(model_dir, slots=2, max_loras=2)
    try:
        work = [(a, p) for a, p in jobs(adapter_dirs)[1:]] * 2
        results = await asyncio.gather(
            *(run(engine, f"ev-{i}", PROMPTS[0], a, p) for i, (a, p) in enumerate(work))
        )
        for (adapter, _), (tokens, _) in zip(work, results, strict=True):
            assert tokens == expected[adapter][0]
        assert len(engine.stats().adapters_resident) == 2
        assert len(engine.adapter_cache.held) == 2  # type: ignore[union-attr]
    finally:
        engine.shutdown()


async def test_prefix_cache_never_crosses_adapters(
    model_dir: Path, adapter_dirs: list[Path], expected: dict[str, list[list[int]]]
) -> None:
    engine = make_engine(model_dir)
    prompt = PROMPTS[2]  # 13 tokens: 3 full blocks
    a0, a1 = str(adapter_dirs[0]), str(adapter_dirs[1])
    try:
        _, cached = await run(engine, "p-a0", prompt, "t/a0", a0)
        assert cached == 0
        tokens, cached = await run(engine, "p-a1", prompt, "t/a1", a1)
        assert cached == 0 and tokens == expected["t/a1"][2]
        tokens, cached = await run(engine, "p-base", prompt)
        assert cached == 0 and tokens == expected[""][2]
        tokens, cached = await run(engine, "p-a0-again", prompt, "t/a0", a0)
        assert cached > 0 and tokens == expected["t/a0"][2]
    finally:
        engine.shutdown()


async def test_decodes_keep_running_while_an_adapter_is_read(
    model_dir: Path, adapter_dirs: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read from storage is off the engine loop: a running decode keeps producing tokens."""
    release = threading.Event()
    real = host_cache.load_adapter_weights

    def slow_load(*args, **kwargs):  # type: ignore[no-untyped-def]
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(host_cache, "load_adapter_weights", slow_load)
    engine = make_engine(model_dir)
    try:
        tokens_while_loading = 0

        async def base() -> None:
            nonlocal tokens_while_loading
            async for out in engine.generate("long", PROMPTS[0], params(40)):
                if not release.is_set():
                    tokens_while_loading += len(out.new_token_ids)
                    if tokens_while_loading >= 10:
                        release.set()

        adapter_task = asyncio.create_task(
            run(engine, "ad", PROMPTS[1], "t/a0", str(adapter_dirs[0]))
        )
        await asyncio.wait_for(base(), 60)
        tokens, _ = await asyncio.wait_for(adapter_task, 60)
        assert tokens_while_loading >= 10
        assert len(tokens) == MAX_NEW
    finally:
        release.set()
        engine.shutdown()


async def test_an_adapter_over_the_rank_limit_is_refused(model_dir: Path, tmp_path: Path) -> None:
    big = make_peft_adapter(model_dir, tmp_path / "big", rank=MAX_RANK * 2, seed=9)
    engine = make_engine(model_dir)
    try:
        with pytest.raises(InvalidArgument) as refused:
            await run(engine, "big", PROMPTS[0], "t/big", str(big))
        assert refused.value.field == "adapter_config.r"
    finally:
        engine.shutdown()
