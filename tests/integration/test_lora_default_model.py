"""Multi-LoRA on the default model (SmolLM2-135M-Instruct): FlowServe's batched LoRA against
peft's merged model on the same weights, alone and in one mixed batch with the base model.

Starts no processes: the engine runs in this process on the CPU.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from deepserve.flowserve.engine.async_engine import AsyncEngine
from deepserve.flowserve.pod.engine_builder import build_engine
from deepserve.flowserve.settings import FlowServeSettings
from deepserve.models.catalog import DEFAULT_MODEL, default_cache_dir
from deepserve.models.pull import pull_model
from deepserve.sampling_params import SamplingParams
from deepserve.tokenizer import Tokenizer
from tests.lora_adapters import make_peft_adapter, peft_merged_greedy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MAX_NEW = 12
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea."]
# rank, seed, targets: every projection; attention only.
ADAPTERS = [(8, 1, None), (16, 2, ["q_proj", "k_proj", "v_proj", "o_proj"])]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return pull_model(DEFAULT_MODEL, default_cache_dir())


@pytest.fixture(scope="module")
def prompts(model_dir: Path) -> list[list[int]]:
    tokenizer = Tokenizer.from_model_dir(model_dir)
    return [tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]


@pytest.fixture(scope="module")
def adapters(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("smollm-adapters")
    # peft's random init scaled down: the adapters change the answers without turning the
    # model into noise where float rounding could decide a near-tie.
    return [
        make_peft_adapter(model_dir, root / f"a{i}", rank=r, alpha=r, seed=s, targets=t, scale=0.5)
        for i, (r, s, t) in enumerate(ADAPTERS)
    ]


@pytest.fixture(scope="module")
def expected(model_dir: Path, adapters: list[Path], prompts: list[list[int]]) -> dict[str, list]:
    refs = {"": peft_merged_greedy(model_dir, None, prompts, MAX_NEW)}
    for i, path in enumerate(adapters):
        refs[f"t/a{i}"] = peft_merged_greedy(model_dir, path, prompts, MAX_NEW)
    return refs


async def generate(
    engine: AsyncEngine, rid: str, prompt: list[int], adapter: str, path: str
) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    tokens: list[int] = []
    async for out in engine.generate(rid, prompt, params, adapter=adapter, adapter_path=path):
        tokens.extend(out.new_token_ids)
    return tokens


def test_greedy_tokens_match_peft_merged_alone_and_in_a_mixed_batch(
    model_dir: Path, adapters: list[Path], prompts: list[list[int]], expected: dict[str, list]
) -> None:
    for i in range(len(adapters)):
        assert expected[f"t/a{i}"] != expected[""], "the adapter must change the answer"
    engine, _, _ = build_engine(model_dir, FlowServeSettings(kv_cache_memory_mb=128), tp_size=1)
    jobs = [("", "")] + [(f"t/a{i}", str(p)) for i, p in enumerate(adapters)]

    async def run() -> None:
        for adapter, path in jobs:
            for p, prompt in enumerate(prompts):
                alone = await generate(engine, f"alone-{adapter}-{p}", prompt, adapter, path)
                assert alone == expected[adapter][p], (adapter, p)
        work = [(a, path, p) for a, path in jobs for p in range(len(prompts))]
        mixed = await asyncio.gather(
            *(generate(engine, f"mix-{a}-{p}", prompts[p], a, path) for a, path, p in work)
        )
        for (adapter, _, p), tokens in zip(work, mixed, strict=True):
            assert tokens == expected[adapter][p], (adapter, p)

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()
