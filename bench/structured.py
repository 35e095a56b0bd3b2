"""Structured outputs and context caching on FlowServe, each against its baseline in one run.

Part 1, JSON-schema decoding throughput: N chat requests that must answer in a JSON schema run
all at once under the grammar; then the same prompts run unconstrained, each forced to the same
number of output tokens its constrained twin produced (ignore_eos). Output tokens per second of
the two runs, and their ratio (goal >= 0.9x: masking costs under 10%).

Part 2, compile cost: the first constrained request of an engine builds llguidance's token trie
for the tokenizer; the first request of a new schema compiles its grammar; later requests of
that schema take a copy of the compiled one. Each is timed on a fresh compiler.

Part 3, context caching: a long shared prefix pinned as a cached context, then requests that
continue it, against the same requests sent cold (a fresh cache salt each, so nothing is
reused); time to first token of each, alternating.

    .venv/bin/python -m bench.structured            # 16 requests, 8 TTFT pairs
    .venv/bin/python -m bench.structured --quick    # 8 requests, 4 pairs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import time
from pathlib import Path

import torch

from bench.common import markdown_table, percentile, progress
from deepserve.flowserve.engine.async_engine import AsyncEngine
from deepserve.flowserve.pod.engine_builder import build_engine
from deepserve.flowserve.sampling.grammar import GrammarCompiler
from deepserve.flowserve.settings import FlowServeSettings
from deepserve.models.catalog import DEFAULT_MODEL, default_cache_dir, find_catalog_model
from deepserve.models.pull import pull_model
from deepserve.sampling_params import SamplingParams
from deepserve.structured_output import StructuredOutput
from deepserve.tokenizer import Tokenizer

THROUGHPUT_GOAL = 0.9
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
        "genres": {
            "type": "array",
            "items": {"enum": ["drama", "comedy", "action", "horror", "documentary"]},
            "minItems": 1,
            "maxItems": 3,
        },
        "cast": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 30},
                    "role": {"type": "string", "maxLength": 30},
                },
                "required": ["name", "role"],
                "additionalProperties": False,
            },
            "minItems": 2,
            "maxItems": 3,
        },
        "rating": {"type": "number", "minimum": 0, "maximum": 10},
    },
    "required": ["title", "year", "genres", "cast", "rating"],
    "additionalProperties": False,
}
TOPICS = [
    "a space opera",
    "a detective story in Paris",
    "a family comedy",
    "a documentary about bees",
    "a heist film",
    "a ghost story",
    "a sports drama",
    "a road movie",
]


def _cpu_s() -> float:
    """CPU seconds of this process, every thread (a shared host moves it far less than wall)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _stream(
    engine: AsyncEngine, rid: str, prompt: list[int], params: SamplingParams, salt: str = ""
) -> tuple[int, float, float, str]:
    """(output tokens, seconds to the first token, seconds to the end, text)."""
    start = time.perf_counter()
    first = 0.0
    tokens, text = 0, ""
    async for out in engine.generate(rid, prompt, params, cache_salt=salt):
        if out.new_token_ids and not first:
            first = time.perf_counter() - start
        tokens += len(out.new_token_ids)
        text += out.new_text
    return tokens, first, time.perf_counter() - start, text


async def throughput(
    engine: AsyncEngine, tokenizer: Tokenizer, n: int
) -> tuple[dict[str, float], dict[str, float]]:
    prompts = [
        tokenizer.encode_chat(
            [{"role": "user", "content": f"Invent {TOPICS[i % len(TOPICS)]} (#{i}) as JSON."}]
        )
        for i in range(n)
    ]
    constraint = StructuredOutput.json_schema(SCHEMA)

    cpu: dict[str, float] = {"json": 0.0, "free": 0.0}

    async def run(tag: str, params_of) -> tuple[float, list[tuple[int, float, float, str]]]:
        start, cpu_start = time.perf_counter(), _cpu_s()
        results = await asyncio.gather(
            *(_stream(engine, f"{tag}-{i}", p, params_of(i)) for i, p in enumerate(prompts))
        )
        cpu[tag.split("-")[0]] += _cpu_s() - cpu_start
        return time.perf_counter() - start, list(results)

    def constrained(i: int) -> SamplingParams:
        return SamplingParams(temperature=0.7, seed=i, max_tokens=300, structured_output=constraint)

    progress("structured: warm-up (compiles the schema once)")
    await _stream(engine, "warm", prompts[0], constrained(0))
    await _stream(engine, "warm-free", prompts[0], SamplingParams(max_tokens=8, ignore_eos=True))
    # ABBA: constrained, unconstrained, unconstrained, constrained, so a host load that drifts
    # during the run weighs on both alike. Seeded sampling repeats the same tokens each time.
    progress(f"structured: {n} constrained requests (A)")
    wall_c1, res_c = await run("json-a", constrained)
    lengths = [r[0] for r in res_c]

    def free(i: int) -> SamplingParams:
        return SamplingParams(temperature=0.7, seed=i, max_tokens=lengths[i], ignore_eos=True)

    progress(f"structured: {n} unconstrained requests of the same lengths (B, B)")
    wall_u1, res_u = await run("free-b1", free)
    wall_u2, res_u2 = await run("free-b2", free)
    progress(f"structured: {n} constrained requests (A)")
    wall_c2, res_c2 = await run("json-a2", constrained)
    valid = 0
    for _, _, _, text in [*res_c, *res_c2]:
        try:
            json.loads(text)
            valid += 1
        except ValueError:
            pass
    wall_c, wall_u = wall_c1 + wall_c2, wall_u1 + wall_u2
    res_c, res_u = [*res_c, *res_c2], [*res_u, *res_u2]
    lengths = [r[0] for r in res_c]
    tokens_c, tokens_u = sum(lengths), sum(r[0] for r in res_u)

    def figures(
        wall: float, tokens: int, res: list[tuple[int, float, float, str]]
    ) -> dict[str, float]:
        tpot = [(r[2] - r[1]) / max(1, r[0] - 1) for r in res]
        kind = "json" if res is res_c else "free"
        return {
            "wall_s": wall,
            "cpu_s": cpu[kind],
            "tok_cpu_s": tokens / cpu[kind],
            "tokens": tokens,
            "tok_s": tokens / wall,
            "ttft_p50_ms": 1000 * statistics.median(r[1] for r in res),
            "tpot_p50_ms": 1000 * statistics.median(tpot),
            "valid": valid if res is res_c else float("nan"),
        }

    return figures(wall_c, tokens_c, res_c), figures(wall_u, tokens_u, res_u)


def compile_costs(tokenizer: Tokenizer, vocab_size: int, eos: tuple[int, ...]) -> dict[str, float]:
    fresh = GrammarCompiler(tokenizer.backend.to_str, vocab_size, eos)
    start = time.perf_counter()
    fresh.matcher(StructuredOutput.json_schema({"type": "object"}))
    trie_and_first = time.perf_counter() - start
    schema = StructuredOutput.json_schema(SCHEMA)
    start = time.perf_counter()
    fresh.matcher(schema)
    first_compile = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(20):
        fresh.matcher(schema)
    cached = (time.perf_counter() - start) / 20
    return {
        "token trie + first grammar (first constrained request of an engine)": trie_and_first,
        "first compile of the benchmark schema": first_compile,
        "same schema again (cached, a copy)": cached,
    }


async def context_ttft(
    engine: AsyncEngine, tokenizer: Tokenizer, pairs: int
) -> tuple[list[float], list[float], int]:
    prefix = tokenizer.encode_chat(
        [
            {
                "role": "system",
                "content": "You are a support agent for a large online shop. "
                + "Policy: refunds within 30 days, exchanges within 60, free shipping over 50. "
                * 24,
            }
        ],
        add_generation_prompt=False,
    )
    pinned, _ = await engine.pin_context("bench-ctx", prefix, salt="bench-tenant")
    cached_ttft, cold_ttft = [], []
    for i in range(pairs):
        question = tokenizer.encode(
            f"<|im_start|>user\nQuestion {i}: can I return shoes?<|im_end|>\n<|im_start|>assistant\n",
            add_special_tokens=False,
        )
        prompt = [*prefix, *question]
        params = SamplingParams(temperature=0.0, max_tokens=1)
        _, ttft, _, _ = await _stream(engine, f"cold-{i}", prompt, params, salt=f"cold-{i}")
        cold_ttft.append(ttft)
        _, ttft, _, _ = await _stream(engine, f"ctx-{i}", prompt, params, salt="bench-tenant")
        cached_ttft.append(ttft)
    await engine.unpin_context("bench-ctx")
    return cold_ttft, cached_ttft, pinned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="")
    args = parser.parse_args()
    n, pairs = (8, 4) if args.quick else (16, 8)
    cache = default_cache_dir()
    model_dir = cache / DEFAULT_MODEL
    if not (model_dir / "config.json").exists():
        entry = find_catalog_model(DEFAULT_MODEL)
        assert entry is not None
        pull_model(entry, cache)
    settings = FlowServeSettings(device=args.device, max_num_seqs=max(32, n), kv_cache_blocks=2048)
    engine, tokenizer, _ = build_engine(Path(model_dir), settings, tp_size=1)
    try:
        compiler = engine.grammar_compiler
        assert compiler is not None
        costs = compile_costs(tokenizer, compiler.vocab_size, tuple(engine.core.eos_token_ids))
        json_run, free_run = asyncio.run(throughput(engine, tokenizer, n))
        cold, cached, pinned = asyncio.run(context_ttft(engine, tokenizer, pairs))
    finally:
        engine.shutdown()
    ratio = json_run["tok_s"] / free_run["tok_s"]
    print(
        f"\nSmolLM2-135M, {torch.get_num_threads()} threads, {n} requests at once, "
        "runs ordered constrained, unconstrained x2, constrained (sums)\n"
    )
    print(
        markdown_table(
            [
                "run",
                "output tokens",
                "wall s",
                "output tok/s",
                "CPU s",
                "output tok / CPU s",
                "TTFT p50 ms",
                "TPOT p50 ms",
                "valid JSON",
            ],
            [
                [
                    "JSON schema",
                    int(json_run["tokens"]),
                    json_run["wall_s"],
                    json_run["tok_s"],
                    json_run["cpu_s"],
                    json_run["tok_cpu_s"],
                    json_run["ttft_p50_ms"],
                    json_run["tpot_p50_ms"],
                    f"{int(json_run['valid'])}/{2 * n}",
                ],
                [
                    "unconstrained, same lengths",
                    int(free_run["tokens"]),
                    free_run["wall_s"],
                    free_run["tok_s"],
                    free_run["cpu_s"],
                    free_run["tok_cpu_s"],
                    free_run["ttft_p50_ms"],
                    free_run["tpot_p50_ms"],
                    "-",
                ],
            ],
        )
    )
    verdict = "met" if ratio >= THROUGHPUT_GOAL else "NOT met"
    cpu_ratio = json_run["tok_cpu_s"] / free_run["tok_cpu_s"]
    print(
        f"\nconstrained / unconstrained throughput: **{ratio:.2f}x** wall, **{cpu_ratio:.2f}x** "
        f"per CPU second (goal >= {THROUGHPUT_GOAL}x, wall: {verdict})\n"
    )
    print(markdown_table(["compile", "ms"], [[k, 1000 * v] for k, v in costs.items()]))
    print(
        f"\ncached context: {len(cached)} pairs, prefix of {pinned} pinned tokens; "
        "TTFT of one-token requests"
    )
    print(
        markdown_table(
            ["prefix", "TTFT p50 ms", "TTFT min ms", "TTFT max ms"],
            [
                [
                    "cold (fresh salt)",
                    1000 * statistics.median(cold),
                    1000 * min(cold),
                    1000 * max(cold),
                ],
                [
                    "cached context",
                    1000 * statistics.median(cached),
                    1000 * min(cached),
                    1000 * max(cached),
                ],
            ],
        )
    )
    print(
        f"\nTTFT cold / cached: **{statistics.median(cold) / statistics.median(cached):.1f}x** (p50); p99 cached {1000 * percentile(cached, 99):.1f} ms"
    )


if __name__ == "__main__":
    main()
