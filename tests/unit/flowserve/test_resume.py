"""Resuming a migrated request from its output tokens gives what an uninterrupted run gives.

A request resumed with the first k tokens another instance generated must continue with exactly
the tokens, text, finish reason and usage of the run that was never interrupted: greedy and
seeded, with penalties, min_tokens, stop strings that span the cut, partial UTF-8 characters at
the cut, and logprobs. On the deterministic fake executor (serial and asynchronous scheduling)
and on a tiny random Llama with its byte-level tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from deepserve.errors import InvalidArgument
from deepserve.flowserve.engine.async_engine import AsyncEngine, EngineConfig, EngineCore
from deepserve.flowserve.engine.output_processor import detokenizer_factory_for
from deepserve.flowserve.engine.outputs import GenerationOutput
from deepserve.flowserve.engine.request import Request
from deepserve.flowserve.runner.executor import UniprocExecutor
from deepserve.flowserve.testing.fake_executor import FakeExecutor
from deepserve.sampling_params import SamplingParams
from deepserve.tokenizer import Tokenizer
from tests.tiny_model import make_tiny_llama

VOCAB = 97
BS = 4
PROMPT = [5, 17, 3, 88, 41, 9, 60]


@dataclass
class Run:
    """What one request produced: per-output tokens and text, then the finish."""

    tokens: list[int]
    texts: list[str]
    finish_reason: str | None
    prompt_tokens: int
    output_tokens: int
    logprobs: list[float]

    def text_before(self, k: int) -> str:
        """The text the client had once k tokens were streamed (one output per token)."""
        return "".join(self.texts[:k])


def collect(outputs: Sequence[GenerationOutput]) -> Run:
    last = outputs[-1]
    return Run(
        tokens=[t for o in outputs for t in o.new_token_ids],
        texts=[o.new_text for o in outputs],
        finish_reason=last.finish_reason,
        prompt_tokens=last.num_prompt_tokens,
        output_tokens=last.num_output_tokens,
        logprobs=[lp.logprob for o in outputs for lp in (o.logprobs or [])],
    )


def fake_config(async_scheduling: bool) -> EngineConfig:
    return EngineConfig(
        block_size=BS,
        num_gpu_blocks=64,
        max_num_seqs=4,
        step_token_budget=16,
        max_model_len=128,
        vocab_size=VOCAB,
        async_scheduling=async_scheduling,
    )


def run_fake(
    params: SamplingParams,
    resumed: Sequence[int] = (),
    *,
    async_scheduling: bool = True,
    eos: Sequence[int] = (),
    neighbours: int = 0,
) -> Run:
    """The request on a fresh fake engine, beside `neighbours` other requests in its steps."""
    cfg = fake_config(async_scheduling)
    executor = FakeExecutor(64, BS, VOCAB)
    core = EngineCore(cfg, executor, eos_token_ids=eos)
    for i in range(neighbours):
        other = [(i * 13 + j) % VOCAB for j in range(3 + i)]
        core.add_request(Request(f"n{i}", other, 6, sampling_params=SamplingParams(max_tokens=6)))
    max_tokens = params.max_tokens or 20
    core.add_request(
        Request("r", list(PROMPT), max_tokens, sampling_params=params, output_token_ids=resumed)
    )
    outputs = [o for o in core.drain() if o.request_id == "r"]
    core.shutdown()
    return collect(outputs)


def assert_resumes_identically(full: Run, resumed: Run, k: int) -> None:
    assert full.tokens[:k] + resumed.tokens == full.tokens
    assert full.text_before(k) + "".join(resumed.texts) == "".join(full.texts)
    assert resumed.finish_reason == full.finish_reason
    assert resumed.prompt_tokens == full.prompt_tokens == len(PROMPT)
    assert resumed.output_tokens == full.output_tokens == len(full.tokens)
    assert resumed.logprobs == pytest.approx(full.logprobs[k:])


# Temperature 2 flattens the fake executor's one-hot logits enough that the seed decides.
SEEDED = {"temperature": 2.0, "seed": 1234}


@pytest.mark.parametrize("async_scheduling", [True, False])
@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0.0},
        SEEDED,
        {**SEEDED, "frequency_penalty": 1.5, "presence_penalty": 0.5, "top_k": 40},
        {**SEEDED, "repetition_penalty": 1.3, "top_p": 0.9, "logprobs": True, "top_logprobs": 2},
    ],
    ids=["greedy", "seeded", "seeded-penalties", "seeded-repetition-logprobs"],
)
def test_resumed_request_continues_exactly_on_the_fake_executor(
    params: dict[str, object], async_scheduling: bool
) -> None:
    sampling = SamplingParams(max_tokens=16, **params)  # type: ignore[arg-type]
    full = run_fake(sampling, async_scheduling=async_scheduling)
    assert len(full.tokens) == 16
    # Another batch composition must not matter either (seeded rows draw from their own RNG).
    assert run_fake(sampling, async_scheduling=async_scheduling, neighbours=3).tokens == full.tokens
    for k in (1, 2, 7, 15):
        resumed = run_fake(
            sampling, full.tokens[:k], async_scheduling=async_scheduling, neighbours=k % 3
        )
        assert_resumes_identically(full, resumed, k)


def test_min_tokens_and_eos_count_the_resumed_tokens() -> None:
    eos = FakeExecutor.reference(PROMPT, 12, VOCAB)[5]  # greedy output's 6th token as EOS
    plain = run_fake(SamplingParams(temperature=0.0, max_tokens=12), eos=[eos])
    assert plain.finish_reason == "stop" and len(plain.tokens) == 6
    # min_tokens 8: the EOS at position 5 is masked; the run continues past it.
    held = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=8)
    full = run_fake(held, eos=[eos])
    assert len(full.tokens) > 6
    for k in (3, 6, 7):
        assert_resumes_identically(full, run_fake(held, full.tokens[:k], eos=[eos]), k)


def test_resumed_tokens_count_against_max_tokens() -> None:
    sampling = SamplingParams(temperature=0.0, max_tokens=5)
    full = run_fake(sampling)
    resumed = run_fake(sampling, full.tokens[:4])
    assert resumed.tokens == full.tokens[4:] and resumed.finish_reason == "length"
    assert resumed.output_tokens == 5


async def test_async_engine_validates_resumed_tokens() -> None:
    engine = AsyncEngine(fake_config(True), FakeExecutor(64, BS, VOCAB))
    try:
        for resumed, why in (([VOCAB + 3], "outside the vocabulary"), ([1] * 5, "max_tokens")):
            with pytest.raises(InvalidArgument) as err:
                async for _ in engine.generate(
                    "bad", PROMPT, SamplingParams(max_tokens=5), output_token_ids=resumed
                ):
                    pass
            assert err.value.field == "output_token_ids"
            assert why in err.value.message
        outputs = [
            o
            async for o in engine.generate(
                "ok", PROMPT, SamplingParams(temperature=0.0, max_tokens=6), output_token_ids=[4]
            )
        ]
        assert outputs[-1].num_output_tokens == 6
        assert sum(len(o.new_token_ids) for o in outputs) == 5
        # The prompt's KV is reused from the cache; usage counts only prompt tokens as cached.
        assert outputs[-1].num_cached_tokens <= len(PROMPT)
    finally:
        engine.shutdown()


# ----- a tiny Llama with a byte-level tokenizer: real logits, real detokenizer ---------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Tokenizer]:
    torch.set_num_threads(1)
    path = make_tiny_llama(tmp_path_factory.mktemp("resume") / "tiny-llama")
    return path, Tokenizer.from_model_dir(path)


def llama_engine(path: Path, tokenizer: Tokenizer) -> AsyncEngine:
    executor = UniprocExecutor(
        path, num_blocks=64, block_size=BS, device="cpu", dtype=torch.float32
    )
    config = EngineConfig(
        block_size=BS, num_gpu_blocks=64, max_num_seqs=4, step_token_budget=32, max_model_len=128
    )
    return AsyncEngine.from_executor(
        config, executor, detokenizer_factory=detokenizer_factory_for(tokenizer)
    )


async def llama_run(
    engine: AsyncEngine, rid: str, prompt: list[int], params: SamplingParams, resumed: list[int]
) -> Run:
    outputs = [o async for o in engine.generate(rid, prompt, params, output_token_ids=resumed)]
    return collect(outputs)


async def test_resumed_request_continues_exactly_on_a_tiny_llama(
    tiny: tuple[Path, Tokenizer],
) -> None:
    path, tokenizer = tiny
    prompt = tokenizer.encode("Once upon a time, ")
    engine = llama_engine(path, tokenizer)
    try:
        for params in (
            SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
            SamplingParams(
                temperature=1.0, seed=7, max_tokens=24, ignore_eos=True, frequency_penalty=0.4
            ),
        ):
            full = await llama_run(engine, "full", prompt, params, [])
            assert len(full.tokens) == 24
            # Byte-level tokens: a random model emits broken UTF-8, so some cuts fall inside a
            # character whose bytes the detokenizer still holds back.
            for k in (1, 5, 11, 23):
                resumed = await llama_run(engine, f"r{k}", prompt, params, full.tokens[:k])
                assert full.tokens[:k] + resumed.tokens == full.tokens
                assert full.text_before(k) + "".join(resumed.texts) == "".join(full.texts)
                assert resumed.output_tokens == 24 and resumed.prompt_tokens == len(prompt)
    finally:
        engine.shutdown()


async def test_stop_string_spanning_the_cut_is_matched_and_never_leaks(
    tiny: tuple[Path, Tokenizer],
) -> None:
    path, tokenizer = tiny
    prompt = tokenizer.encode("The answer is ")
    engine = llama_engine(path, tokenizer)
    try:
        plain = SamplingParams(temperature=1.0, seed=11, max_tokens=30, ignore_eos=True)
        free = await llama_run(engine, "free", prompt, plain, [])
        # The text of tokens 10..13 as a stop string (its first occurrence ends the run).
        stop = "".join(free.texts[10:14])
        assert len(stop) >= 2, "this seed gives no usable stop string"
        params = SamplingParams(
            temperature=1.0, seed=11, max_tokens=30, ignore_eos=True, stop=[stop]
        )
        full = await llama_run(engine, "full", prompt, params, [])
        assert full.finish_reason == "stop"
        assert stop not in "".join(full.texts)
        n = len(full.tokens)
        # Cuts inside the stop string (it ends with the last token and spans several): the
        # text the first instance held back as a possible stop must be held back again.
        held = [k for k in (n - 1, n - 2, n - 3) if k >= 1 and not "".join(full.texts[k:])]
        assert held, "no cut falls inside the held-back stop string"
        for k in (n - 3, n - 2, n - 1):
            if k < 1:
                continue
            resumed = await llama_run(engine, f"s{k}", prompt, params, full.tokens[:k])
            assert full.tokens[:k] + resumed.tokens == full.tokens
            assert full.text_before(k) + "".join(resumed.texts) == "".join(full.texts)
            assert resumed.finish_reason == "stop"
            assert resumed.output_tokens == n
    finally:
        engine.shutdown()
