"""Structured outputs in the engine: a tiny random Llama whose every output token is the grammar's.

A random model left alone emits bytes at random; under a JSON schema, a regex or a choice list
the engine's token bitmasks must make every output match, with greedy and sampled decoding, in
steps shared with unconstrained requests, across preemption (a KV cache too small for all) and
prefix-cache hits, with and without asynchronous scheduling.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch

from deepserve.errors import InvalidArgument
from deepserve.flowserve.engine.async_engine import AsyncEngine, EngineConfig
from deepserve.flowserve.engine.output_processor import detokenizer_factory_for
from deepserve.flowserve.runner.executor import UniprocExecutor
from deepserve.flowserve.sampling.grammar import (
    GrammarCompiler,
    TokenBitmask,
    apply_token_bitmask,
    bitmask_words,
)
from deepserve.sampling_params import SamplingParams
from deepserve.structured_output import StructuredOutput
from deepserve.tokenizer import Tokenizer
from tests.tiny_model import make_tiny_llama

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-grammar"))


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_model_dir(model_dir)


def make_engine(
    model_dir: Path, tokenizer: Tokenizer, *, num_blocks: int = 128, async_scheduling: bool = True
) -> AsyncEngine:
    executor = UniprocExecutor(
        model_dir, num_blocks=num_blocks, block_size=4, device="cpu", dtype=torch.float32
    )
    vocab = executor.config.vocab_size  # type: ignore[attr-defined]
    eos = tokenizer.eos_token_ids
    config = EngineConfig(
        block_size=4,
        num_gpu_blocks=num_blocks,
        max_num_seqs=8,
        step_token_budget=64,
        max_model_len=512,
        async_scheduling=async_scheduling,
    )
    return AsyncEngine.from_executor(
        config,
        executor,
        eos_token_ids=eos,
        detokenizer_factory=detokenizer_factory_for(tokenizer),
        grammar_compiler=GrammarCompiler(tokenizer.backend.to_str, vocab, eos),
    )


async def run(engine: AsyncEngine, request_id: str, prompt: list[int], params: SamplingParams):
    text, tokens, finish = "", [], None
    async for out in engine.generate(request_id, prompt, params):
        text += out.new_text
        tokens.extend(out.new_token_ids)
        finish = out.finish_reason
    return text, tokens, finish


def schema_params(max_tokens: int = 200, **kw: object) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens, structured_output=StructuredOutput.json_schema(SCHEMA), **kw
    )


@pytest.mark.parametrize("async_scheduling", [True, False])
async def test_json_schema_outputs_validate_greedy_and_sampled(
    model_dir: Path, tokenizer: Tokenizer, async_scheduling: bool
) -> None:
    engine = make_engine(model_dir, tokenizer, async_scheduling=async_scheduling)
    prompt = tokenizer.encode("Give me a person as JSON:")
    try:
        jobs = [run(engine, "greedy", prompt, schema_params(temperature=0.0))]
        jobs += [
            run(engine, f"sampled-{i}", prompt, schema_params(temperature=1.0, seed=i))
            for i in range(4)
        ]
        # Unconstrained requests share the steps: they must stay free text.
        free = SamplingParams(temperature=1.0, seed=7, max_tokens=40, ignore_eos=True)
        jobs += [run(engine, f"free-{i}", prompt, free) for i in range(2)]
        results = await asyncio.gather(*jobs)
    finally:
        engine.shutdown()
    for text, _tokens, finish in results[:5]:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
        # No whitespace the schema does not need (compact separators, no padding).
        assert not re.search(r"[\s]", text.replace(" ", "")), text
    free_texts = [text for text, _, _ in results[5:]]
    assert all(len(t) > 0 for t in free_texts)
    assert not all(_is_json(t) for t in free_texts)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


async def test_regex_choice_grammar_and_json_object(model_dir: Path, tokenizer: Tokenizer) -> None:
    engine = make_engine(model_dir, tokenizer)
    prompt = tokenizer.encode("Answer:")
    cases = [
        (StructuredOutput("regex", r"[0-9]{3}-[a-z]{2,4}", "guided_regex"), r"[0-9]{3}-[a-z]{2,4}"),
        (StructuredOutput.choice(["positive", "negative"]), r"positive|negative"),
        (StructuredOutput("grammar", 'root ::= "yes" | "no"', "guided_grammar"), r"yes|no"),
    ]
    try:
        for i, (constraint, pattern) in enumerate(cases):
            for seed in range(3):
                params = SamplingParams(
                    temperature=1.0, seed=seed, max_tokens=40, structured_output=constraint
                )
                text, _, finish = await run(engine, f"c{i}-{seed}", prompt, params)
                assert re.fullmatch(pattern, text), (constraint.kind, text)
                assert finish == "stop"
        obj = SamplingParams(
            temperature=0.0, max_tokens=100, structured_output=StructuredOutput("json_object")
        )
        text, _, finish = await run(engine, "obj", prompt, obj)
        if finish == "stop":
            assert isinstance(json.loads(text), dict)
        else:  # an object may legally nest past max_tokens; it must still be a JSON prefix
            assert text.startswith("{")
    finally:
        engine.shutdown()


async def test_constrained_requests_survive_preemption_and_prefix_hits(
    model_dir: Path, tokenizer: Tokenizer
) -> None:
    # 40 blocks of 4 tokens cannot hold six ~100-token requests at once: some are preempted
    # and recomputed; their matchers must go on from the tokens they kept.
    engine = make_engine(model_dir, tokenizer, num_blocks=40)
    prompt = tokenizer.encode("Same prefix for everyone, then JSON:")
    try:
        results = await asyncio.gather(
            *(
                run(engine, f"p{i}", prompt, schema_params(100, temperature=1.0, seed=i))
                for i in range(6)
            )
        )
        stats = engine.stats()
    finally:
        engine.shutdown()
    assert stats.num_preemptions > 0
    assert stats.prefix_cache_hit_rate > 0
    for text, _, finish in results:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)


async def test_invalid_grammar_is_refused_before_the_first_token(
    model_dir: Path, tokenizer: Tokenizer
) -> None:
    engine = make_engine(model_dir, tokenizer)
    try:
        params = SamplingParams(
            max_tokens=5, structured_output=StructuredOutput("regex", "[a-", "guided_regex")
        )
        with pytest.raises(InvalidArgument) as err:
            await run(engine, "bad", tokenizer.encode("x"), params)
        assert err.value.field == "guided_regex"
    finally:
        engine.shutdown()


def test_compiled_grammars_are_cached_per_grammar(tokenizer: Tokenizer) -> None:
    compiler = GrammarCompiler(tokenizer.backend.to_str, 259, tokenizer.eos_token_ids)
    schema = StructuredOutput.json_schema(SCHEMA)
    assert compiler.cached_state(schema) is None  # never compiled: the caller must compile
    first, second = compiler.state(schema), compiler.state(schema)
    assert compiler.compiles == 1
    cached = compiler.cached_state(schema)
    assert cached is not None and cached.matcher is not first.matcher
    assert first.matcher is not second.matcher  # each request consumes its own copy
    compiler.state(StructuredOutput.choice(["x", "y"]))
    assert compiler.compiles == 2


def test_a_fresh_matcher_replays_the_output_it_is_given(tokenizer: Tokenizer) -> None:
    # What a resumed request (or a decode instance handed its first token) relies on.
    compiler = GrammarCompiler(tokenizer.backend.to_str, 259, tokenizer.eos_token_ids)
    constraint = StructuredOutput.choice(["alpha", "beta"])
    tokens = tokenizer.encode("alp")
    state = compiler.state(constraint)
    state.catch_up(tokens)
    bits = torch.zeros((1, bitmask_words(259)), dtype=torch.int32)
    state.fill(bits, 0)
    logits = torch.zeros(1, 259)
    apply_token_bitmask(logits, TokenBitmask([0], bits))
    allowed = (logits[0] > float("-inf")).nonzero().flatten().tolist()
    assert tokenizer.encode("h")[0] in allowed
    assert tokenizer.encode("e")[0] not in allowed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masks_forbid_exactly_the_unset_bits_and_padded_ids(dtype: torch.dtype) -> None:
    # float32 takes the host (numpy) path, bfloat16 the torch one: both must agree with the bits.
    generator = torch.Generator().manual_seed(7)
    vocab, padded = 100, 160  # the embedding is padded past the mask's 128 bits
    bits = torch.randint(-(2**31), 2**31 - 1, (2, bitmask_words(vocab)), generator=generator)
    bits = bits.to(torch.int32)
    with torch.inference_mode():  # executors hand back inference tensors
        logits = torch.randn(3, padded, generator=generator).to(dtype)
    untouched = logits[1].clone()
    apply_token_bitmask(logits, TokenBitmask([0, 2], bits))
    for slot, row in enumerate([0, 2]):
        words = bits[slot].tolist()
        for token in range(padded):
            allowed = token < 32 * len(words) and (words[token // 32] >> (token % 32)) & 1
            assert (logits[row, token] > float("-inf")) == bool(allowed), (dtype, row, token)
    assert torch.equal(logits[1], untouched)  # unconstrained rows keep their logits
