"""The default model (SmolLM2-135M-Instruct) served by FlowServe's AsyncEngine, checked against
transformers' LlamaForCausalLM on the same weights.

Starts no processes: the engine runs in this process on the CPU. Pulls the model into the shared
model cache first when it is missing (that needs pip's network access once).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers

from deepserve.flowserve.engine.async_engine import AsyncEngine
from deepserve.flowserve.pod.engine_builder import build_engine
from deepserve.flowserve.settings import FlowServeSettings
from deepserve.models.catalog import DEFAULT_MODEL, default_cache_dir
from deepserve.models.pull import pull_model
from deepserve.sampling_params import SamplingParams
from deepserve.tokenizer import Tokenizer

pytestmark = pytest.mark.integration

MAX_NEW = 32
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a GPU is in one sentence.",
    "List three prime numbers.",
]
_PARAGRAPH = (
    "The river bends around the old mill, where the water slows and the fish rest in the "
    "shade of the willows before the current carries them on toward the sea. "
)
# Prompts of clearly different lengths (about 30 to 300 tokens) and output lengths, so that the
# batch mixes chunked prefills with decodes and requests leave it at different steps.
FILLERS: list[tuple[str, int]] = [
    (f"Summarize this text: {_PARAGRAPH * repeat}", max_tokens)
    for repeat, max_tokens in [
        (0, 5),
        (1, 12),
        (2, 24),
        (3, 7),
        (4, 14),
        (5, 20),
        (6, 9),
        (7, 16),
        (8, 18),
        (1, 3),
        (2, 10),
        (3, 6),
    ]
]


def greedy(max_tokens: int, *, ignore_eos: bool = True) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos)


def chat(tokenizer: Tokenizer, question: str) -> list[int]:
    return tokenizer.encode_chat([{"role": "user", "content": question}])


async def collect(
    engine: AsyncEngine, request_id: str, prompt: list[int], params: SamplingParams
) -> tuple[list[int], str, str | None]:
    tokens: list[int] = []
    text = ""
    finish_reason = None
    async for output in engine.generate(request_id, prompt, params):
        tokens.extend(output.new_token_ids)
        text += output.new_text
        finish_reason = output.finish_reason
    return tokens, text, finish_reason


@pytest.fixture(scope="module")
def model_dir() -> Path:
    # Two cores shared with other test runs.
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return pull_model(DEFAULT_MODEL, default_cache_dir(), progress=print)


@pytest.fixture(scope="module")
def served(model_dir: Path) -> Iterator[tuple[AsyncEngine, Tokenizer]]:
    settings = FlowServeSettings(
        device="cpu", kv_cache_blocks=256, block_size=16, max_num_seqs=64, async_scheduling=True
    )
    engine, tokenizer, _ = build_engine(model_dir, settings, tp_size=1)
    yield engine, tokenizer
    engine.shutdown()


@pytest.fixture(scope="module")
def prompts(served: tuple[AsyncEngine, Tokenizer]) -> list[list[int]]:
    return [chat(served[1], q) for q in QUESTIONS]


@pytest.fixture(scope="module")
def reference(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    """transformers' greedy continuations, one prompt at a time."""
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # Exactly MAX_NEW argmax tokens, eos included, to match ignore_eos on our side.
    model.generation_config.eos_token_id = None
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=MAX_NEW,
                pad_token_id=0,
            )
            outputs.append(out[0, len(prompt) :].tolist())
    return outputs


@pytest.fixture(scope="module")
def alone(served: tuple[AsyncEngine, Tokenizer], prompts: list[list[int]]) -> list[list[int]]:
    """FlowServe's greedy tokens with each request running by itself."""
    engine, _ = served

    async def run() -> list[list[int]]:
        results = []
        for i, prompt in enumerate(prompts):
            tokens, _, _ = await collect(engine, f"alone-{i}", prompt, greedy(MAX_NEW))
            results.append(tokens)
        return results

    return asyncio.run(run())


def test_greedy_tokens_match_transformers(
    served: tuple[AsyncEngine, Tokenizer], alone: list[list[int]], reference: list[list[int]]
) -> None:
    model = served[0].core.executor.runner.model  # type: ignore[attr-defined]
    # The kernels built here serve the prompts and the decodes: this is their parity check.
    assert model.fused_prefill and model.fused_decode
    assert [len(t) for t in alone] == [MAX_NEW] * len(QUESTIONS)
    for question, ours, theirs in zip(QUESTIONS, alone, reference, strict=True):
        assert ours == theirs, question


async def test_same_tokens_inside_a_batch_of_16(
    served: tuple[AsyncEngine, Tokenizer], prompts: list[list[int]], alone: list[list[int]]
) -> None:
    engine, tokenizer = served
    filler_prompts = [chat(tokenizer, text) for text, _ in FILLERS]
    lengths = {len(p) for p in [*prompts, *filler_prompts]}
    assert len(lengths) >= 12 and max(lengths) > 4 * min(lengths)

    batch = [(p, MAX_NEW) for p in prompts] + [
        (p, n) for p, (_, n) in zip(filler_prompts, FILLERS, strict=True)
    ]
    # Interleave the references among the fillers so they are not simply the first rows.
    order = [4, 0, 5, 6, 1, 7, 8, 9, 2, 10, 11, 12, 3, 13, 14, 15]
    results = await asyncio.gather(
        *(collect(engine, f"batch-{i}", batch[i][0], greedy(batch[i][1])) for i in order)
    )
    by_index = {i: tokens for i, (tokens, _, _) in zip(order, results, strict=True)}
    for i, question in enumerate(QUESTIONS):
        assert by_index[i] == alone[i], question
    for i, (_, max_tokens) in enumerate(FILLERS, start=len(prompts)):
        assert len(by_index[i]) == max_tokens

    # Each filler by itself gives what it gave inside the batch.
    for i in range(len(prompts), len(batch)):
        prompt, max_tokens = batch[i]
        tokens, _, _ = await collect(engine, f"filler-{i}", prompt, greedy(max_tokens))
        assert tokens == by_index[i], FILLERS[i - len(prompts)]
    assert engine.stats().kv_blocks_used == 0


async def test_capital_of_france_is_paris(served: tuple[AsyncEngine, Tokenizer]) -> None:
    engine, tokenizer = served
    prompt = chat(tokenizer, "What is the capital of France?")
    tokens, text, finish_reason = await collect(
        engine, "paris", prompt, greedy(24, ignore_eos=False)
    )
    assert "Paris" in text
    assert finish_reason in ("stop", "length")
    assert text == tokenizer.decode(tokens, skip_special_tokens=True)


async def first_token_top5(engine: AsyncEngine, request_id: str, prompt: list[int]) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=True, top_logprobs=5)
    async for output in engine.generate(request_id, prompt, params):
        if output.logprobs:
            return [token for token, _ in output.logprobs[0].top]
    raise AssertionError("no logprobs")


async def test_bfloat16_engine_runs_in_bfloat16_close_to_float32(
    model_dir: Path, served: tuple[AsyncEngine, Tokenizer], prompts: list[list[int]]
) -> None:
    """The dtype setting reaches weights and KV cache, and the first token's distribution stays
    close to the float32 engine's: its choice among bfloat16's top two, four of the top five
    shared. (Greedy text may differ: the model's top two for "capital of France" are 0.09
    logits apart in float32, within bfloat16's rounding.)"""
    settings = FlowServeSettings(device="cpu", dtype="bfloat16", kv_cache_blocks=64, block_size=16)
    engine, _, _ = build_engine(model_dir, settings, tp_size=1)
    try:
        runner = engine.core.executor.runner  # type: ignore[attr-defined]
        assert runner.dtype == torch.bfloat16
        assert runner.model.weights.embed.dtype == torch.bfloat16
        assert runner.kv_cache.dtype == torch.bfloat16
        for index, prompt in enumerate(prompts):
            ours = await first_token_top5(engine, f"bf16-{index}", prompt)
            reference = await first_token_top5(served[0], f"fp32-{index}", prompt)
            assert reference[0] in ours[:2], QUESTIONS[index]
            assert len(set(ours) & set(reference)) >= 4, QUESTIONS[index]
    finally:
        engine.shutdown()
