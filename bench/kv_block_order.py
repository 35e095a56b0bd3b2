"""How KV block allocation lays out block tables, and what that costs decode attention.

Replays the serve_vs_vllm workloads' shapes (a mixed burst, then bench-c8, then bench-c32, per
round) through the real step planner and KV cache manager over the fake executor, once with the
block pool's runs (today's allocation) and once with runs turned off (the free lists' order
alone: never-cached blocks first-in first-out, then the LRU). For each round it reports the share
of neighbouring block pairs in the batch-32 decode steps' tables that are adjacent ids, then
times the paged decode attention kernel on one such step's tables (32 sequences, every layer of
the default model's shape), the two layouts taking turns (issue #19).

    .venv/bin/python -m bench.kv_block_order [--rounds 6] [--dtype float32]
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import time
from dataclasses import dataclass

import torch

from bench.common import markdown_table, progress
from deepserve.flowserve.engine.async_engine import EngineConfig, EngineCore
from deepserve.flowserve.engine.request import Request
from deepserve.flowserve.engine.step_plan import StepPlan
from deepserve.flowserve.kernels import paged_decode
from deepserve.flowserve.testing.fake_executor import SamplingFakeExecutor
from deepserve.sampling_params import SamplingParams

# SmolLM2-135M's attention shape, and the number of 16-token blocks 2 GiB of its float32 KV holds.
LAYERS, HEADS, KV_HEADS, HEAD_DIM = 30, 9, 3, 64
BLOCK_SIZE = 16
NUM_BLOCKS = 2900
VOCAB = 49152


@dataclass
class Layout:
    """One allocation policy's replay: per round, the adjacency share and one step's tables."""

    name: str
    adjacency: list[float]
    tables: list[list[tuple[list[int], int]]]  # per round: (block table, context length) rows


def _adjacent_share(plans: list[StepPlan]) -> float:
    pairs = adjacent = 0
    for plan in plans:
        for seq in plan.sequences:
            pairs += len(seq.block_table) - 1
            adjacent += sum(1 for a, b in itertools.pairwise(seq.block_table) if b == a + 1)
    return adjacent / max(pairs, 1)


def replay(name: str, runs: bool, rounds: int, seed: int) -> Layout:
    config = EngineConfig(
        block_size=BLOCK_SIZE,
        num_gpu_blocks=NUM_BLOCKS,
        max_num_seqs=64,
        step_token_budget=1024,
        max_model_len=4096,
        vocab_size=VOCAB,
    )
    executor = SamplingFakeExecutor(NUM_BLOCKS, BLOCK_SIZE, VOCAB)
    core = EngineCore(config, executor)
    if not runs:
        # Every block waits for its turn: the free lists' order alone.
        core.kv_cache.pool._takes_out_of_turn = lambda block: False  # type: ignore[method-assign]
    rng = random.Random(seed)
    count = 0

    def run(batch: list[tuple[list[int], int]]) -> list[StepPlan]:
        nonlocal count
        for prompt, out in batch:
            params = SamplingParams(temperature=0.0, max_tokens=out, ignore_eos=True)
            core.add_request(Request(f"r{count}", prompt, out, sampling_params=params))
            count += 1
        start = len(executor.plans)
        core.drain()
        return executor.plans[start:]

    def tokens(n: int) -> list[int]:
        return [rng.randrange(100, VOCAB) for _ in range(n)]

    layout = Layout(name, [], [])
    for index in range(rounds):
        run([(tokens(rng.randint(16, 512)), rng.randint(16, 256)) for _ in range(64)])
        burst = [(tokens(256), 64) for _ in range(32)]
        for i in range(0, 32, 8):
            run(burst[i : i + 8])
        burst = [(tokens(256), 64) for _ in range(32)]
        steps = [
            p
            for p in run(burst)
            if len(p.sequences) == 32 and all(len(s.token_ids) == 1 for s in p.sequences)
        ]
        layout.adjacency.append(_adjacent_share(steps))
        middle = steps[len(steps) // 2]
        layout.tables.append([(s.block_table, s.start_pos + 1) for s in middle.sequences])
        progress(f"{name}: round {index}: {layout.adjacency[-1]:.0%} adjacent")
    return layout


def time_attention(
    layouts: list[list[tuple[list[int], int]]],
    caches: list[tuple[torch.Tensor, torch.Tensor]],
    query: torch.Tensor,
    repeats: int,
) -> list[float]:
    """Median ms of one decode step's attention over every layer for each layout's tables; the
    layouts take turns within each repeat (the host's bandwidth moves by the second), and the
    caches are evicted before every step."""
    inputs = []
    for tables in layouts:
        width = max(len(t) for t, _ in tables)
        padded = [t + [0] * (width - len(t)) for t, _ in tables]
        inputs.append(
            (
                torch.tensor(padded, dtype=torch.long),
                torch.tensor([n for _, n in tables], dtype=torch.long),
            )
        )
    scratch = torch.empty(64 << 20, dtype=torch.uint8)
    times: list[list[float]] = [[] for _ in layouts]
    for repeat in range(repeats):
        for index, (block_tables, context_lens) in enumerate(inputs):
            scratch.fill_(repeat)  # beyond the last-level cache: the step reads from DRAM
            start = time.perf_counter()
            for key_cache, value_cache in caches:
                paged_decode.paged_decode(
                    query, key_cache, value_cache, block_tables, context_lens, HEAD_DIM**-0.5
                )
            times[index].append(time.perf_counter() - start)
    return [statistics.median(t) * 1e3 for t in times]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    layouts = [
        replay("runs", True, args.rounds, args.seed),
        replay("free lists", False, args.rounds, args.seed),
    ]
    rows = [[f"{layout.name}, adjacent pairs"] for layout in layouts]
    for row, layout in zip(rows, layouts, strict=True):
        row.extend(f"{share:.0%}" for share in layout.adjacency)
    if paged_decode.available():
        dtype = getattr(torch, args.dtype)
        generator = torch.Generator().manual_seed(args.seed)
        shape = (NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
        progress(f"filling {LAYERS} layers of {NUM_BLOCKS}-block caches ({args.dtype})")
        caches = [
            (
                torch.randn(shape, generator=generator).to(dtype),
                torch.randn(shape, generator=generator).to(dtype),
            )
            for _ in range(LAYERS)
        ]
        query = torch.randn(32, HEADS, HEAD_DIM, generator=generator).to(dtype)
        timed: list[list[float]] = [
            time_attention([layout.tables[i] for layout in layouts], caches, query, args.repeats)
            for i in range(args.rounds)
        ]
        for index, layout in enumerate(layouts):
            label = f"{layout.name}, attention ms ({args.dtype})"
            rows.append([label, *(f"{ms[index]:.1f}" for ms in timed)])
        rows.append(
            [
                f"{layouts[0].name} / {layouts[1].name}",
                *(f"{ms[0] / ms[1]:.2f}x" for ms in timed),
            ]
        )
    else:
        progress("the paged decode kernel is not built here: adjacency only")
    header = ["batch-32 decode step", *(f"round {i}" for i in range(args.rounds))]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
