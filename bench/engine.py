"""FlowServe vs transformers `generate` on one machine, one model, one workload, in one run.

Part 1, throughput: N requests of mixed prompt and output lengths. FlowServe gets all of them at
once through AsyncEngine.generate and is timed per request from its stream. transformers runs
them in static batches (left padding, greedy, KV cache on), grouped by output length so that a
batch wastes few decode steps, at a few batch sizes; the best one is reported. Both produce the
same number of useful tokens per request (ignore_eos on our side, no eos on theirs).

Part 2, batch-1 decode: FlowServe's step time with one request (~100 tokens of context) against
the memory-bandwidth bound: bytes of weights a decode step reads / read bandwidth measured in
this run over a buffer of the same size. The probe alternates: a bandwidth measurement, then a
short decode, four times. The goal's figure is the median of the rounds' ratios, each a round's
step against the bandwidth measured just before it, because a shared host's bandwidth moves
(30-60 GB/s within one run here) far more than the engine does.

    .venv/bin/python -m bench.engine            # the full run (64 requests)
    .venv/bin/python -m bench.engine --quick    # a smaller one
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import itertools
import math
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepserve.flowserve.runner.cpu_huge_pages import ask_for_huge_pages

ask_for_huge_pages()  # as a pod does, before torch loads (transformers, run here too, gets them)

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    Bandwidth,
    markdown_table,
    measure_bandwidth,
    percentile,
    progress,
)
from deepserve.flowserve.engine.async_engine import AsyncEngine  # noqa: E402
from deepserve.flowserve.model.config import ModelConfig  # noqa: E402
from deepserve.flowserve.model.llama_weights import LlamaWeights  # noqa: E402
from deepserve.flowserve.pod.engine_builder import build_engine  # noqa: E402
from deepserve.flowserve.runner.cpu_threads import configure_intraop_threads  # noqa: E402
from deepserve.flowserve.settings import FlowServeSettings  # noqa: E402
from deepserve.models.catalog import DEFAULT_MODEL, default_cache_dir, find_catalog_model  # noqa: E402
from deepserve.models.pull import pull_model  # noqa: E402
from deepserve.sampling_params import SamplingParams  # noqa: E402

THROUGHPUT_GOAL = 4.0  # FlowServe / transformers output tokens per second
DECODE_BOUND_GOAL = 1.3  # batch-1 decode step / memory-bandwidth bound (issue #19)
# Random prompt ids stay clear of the low ids where SmolLM2 keeps its special tokens.
FIRST_PLAIN_TOKEN_ID = 100


@dataclass(frozen=True, slots=True)
class Workload:
    """Prompts (token ids) and how many tokens each request must generate."""

    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


@dataclass(slots=True)
class RunResult:
    """Timings of one system over the whole workload (seconds)."""

    system: str
    wall_s: float
    useful_tokens: int
    # Tokens computed, useful or not (static batches generate up to their longest request).
    generated_tokens: int
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)
    # CPU time of this process over the run: on a shared host it moves less than wall time.
    cpu_s: float = math.nan
    note: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.useful_tokens / self.wall_s


@dataclass(frozen=True, slots=True)
class DecodeStep:
    """FlowServe with one running request: time per generated token and per forward pass."""

    context_len: int
    step_s: list[float]
    forward_s: list[float]


def make_workload(
    num_requests: int,
    prompt_range: tuple[int, int],
    output_range: tuple[int, int],
    vocab_size: int,
    seed: int,
) -> Workload:
    """Uniformly random lengths and random (non-special) prompt token ids, reproducible by seed."""
    rng = random.Random(seed)
    prompts = [
        [rng.randrange(FIRST_PLAIN_TOKEN_ID, vocab_size) for _ in range(rng.randint(*prompt_range))]
        for _ in range(num_requests)
    ]
    output_lens = [rng.randint(*output_range) for _ in range(num_requests)]
    return Workload(prompts, output_lens)


def decode_weight_bytes(weights: LlamaWeights) -> int:
    """Bytes of weights one decode step reads: every layer, the final norm and lm_head.

    The embedding table is only gathered (one row per token) unless it doubles as lm_head, in
    which case it is counted once, as lm_head.
    """
    tensors: list[torch.Tensor] = [weights.final_norm]
    if weights.lm_head is not None:
        tensors.append(weights.lm_head)
    for layer in weights.layers:
        for name in layer.__slots__:
            value = getattr(layer, name)
            if isinstance(value, torch.Tensor):
                tensors.append(value)
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in tensors}
    return sum(unique.values())


# ----- FlowServe ------------------------------------------------------------------------------


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


async def _stream_times(
    engine: AsyncEngine, request_id: str, prompt: list[int], max_tokens: int
) -> list[float]:
    """perf_counter() at each arrival of new tokens, once per token."""
    times: list[float] = []
    async for output in engine.generate(request_id, prompt, greedy(max_tokens)):
        now = time.perf_counter()
        times.extend([now] * len(output.new_token_ids))
    return times


def run_flowserve(engine: AsyncEngine, workload: Workload, tag: str) -> RunResult:
    """Submit every request at once; TTFT and TPOT per request from the stream."""
    num = len(workload.prompts)
    done = 0

    async def one(i: int) -> list[float]:
        nonlocal done
        times = await _stream_times(
            engine, f"{tag}-{i}", workload.prompts[i], workload.output_lens[i]
        )
        done += 1
        if done % max(1, num // 8) == 0 or done == num:
            progress(f"flowserve: {done}/{num} requests done")
        return times

    async def run_all() -> tuple[float, list[list[float]]]:
        start = time.perf_counter()
        return start, list(await asyncio.gather(*(one(i) for i in range(num))))

    cpu_start = time.process_time()
    start, all_times = asyncio.run(run_all())
    cpu_s = time.process_time() - cpu_start
    wall = max(times[-1] for times in all_times) - start
    tokens = sum(len(times) for times in all_times)
    if tokens != workload.num_output_tokens:
        raise RuntimeError(f"FlowServe made {tokens} tokens, {workload.num_output_tokens} asked")
    return RunResult(
        system="FlowServe",
        wall_s=wall,
        useful_tokens=tokens,
        generated_tokens=tokens,
        ttft_s=[times[0] - start for times in all_times],
        tpot_s=[(times[-1] - times[0]) / (len(times) - 1) for times in all_times if len(times) > 1],
        cpu_s=cpu_s,
        note="all requests submitted at t=0; continuous batching",
    )


def measure_decode_step(
    engine: AsyncEngine, context_len: int, num_tokens: int, vocab_size: int
) -> DecodeStep:
    """One request alone: gaps between its tokens (engine step) and the forward pass inside."""
    runner = getattr(engine.core.executor, "runner", None)
    forward_s: list[float] = []
    if runner is not None:
        # Time the real forward calls of this run by wrapping the runner's bound method.
        execute = runner.execute

        def timed_execute(batch: Any) -> torch.Tensor:
            start = time.perf_counter()
            try:
                return execute(batch)
            finally:
                forward_s.append(time.perf_counter() - start)

        runner.execute = timed_execute
    rng = random.Random(1)
    prompt = [rng.randrange(FIRST_PLAIN_TOKEN_ID, vocab_size) for _ in range(context_len)]
    try:
        times = asyncio.run(_stream_times(engine, "decode-1", prompt, num_tokens))
    finally:
        if runner is not None:
            del runner.execute
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Drop the first gap (the pipeline filling) and the prefill forward.
    return DecodeStep(context_len=context_len, step_s=gaps[1:], forward_s=forward_s[2:])


# ----- transformers ---------------------------------------------------------------------------


class _TimingStreamer:
    """transformers streamer that only notes when each batch of tokens came out of generate."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:  # first call: the prompt; then one per step
        self.times.append(time.perf_counter())

    def end(self) -> None:
        self.times.append(time.perf_counter())


def load_transformers(model_dir: Path, device: torch.device, dtype: torch.dtype) -> Any:
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    # No early stop: every batch generates exactly max_new_tokens (the counterpart of ignore_eos).
    model.generation_config.eos_token_id = None
    return model


def run_transformers(
    model: Any,
    workload: Workload,
    batch_size: int,
    device: torch.device,
    pad_id: int,
    log: Callable[[str], None] = progress,
) -> RunResult:
    """Static batches, requests grouped by output length; TTFT = end of the batch's prefill."""
    num = len(workload.prompts)
    order = sorted(range(num), key=lambda i: (workload.output_lens[i], len(workload.prompts[i])))
    batches = [order[i : i + batch_size] for i in range(0, num, batch_size)]
    ttft: list[float] = []
    tpot: list[float] = []
    generated = 0
    cpu_start = time.process_time()
    start = time.perf_counter()
    for n, batch in enumerate(batches):
        prompts = [workload.prompts[i] for i in batch]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        max_new = max(workload.output_lens[i] for i in batch)
        streamer = _TimingStreamer()
        with torch.inference_mode():
            out = model.generate(
                ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,
                max_new_tokens=max_new,
                pad_token_id=pad_id,
                use_cache=True,
                streamer=streamer,
            )
        if out.shape[1] - width != max_new:
            raise RuntimeError(f"transformers made {out.shape[1] - width} tokens, {max_new} asked")
        generated += len(batch) * max_new
        first_token = streamer.times[1]
        finished = streamer.times[-1]
        ttft.extend([first_token - start] * len(batch))
        if max_new > 1:
            tpot.extend([(finished - first_token) / (max_new - 1)] * len(batch))
        log(
            f"transformers bs={batch_size}: batch {n + 1}/{len(batches)} "
            f"({len(batch)} x {width} prompt, {max_new} new) done"
        )
    wall = time.perf_counter() - start
    cpu_s = time.process_time() - cpu_start
    return RunResult(
        system=f"transformers bs={batch_size}",
        wall_s=wall,
        useful_tokens=workload.num_output_tokens,
        generated_tokens=generated,
        ttft_s=ttft,
        tpot_s=tpot,
        cpu_s=cpu_s,
        note="static batches by output length; TTFT = end of its batch's prefill (streamer)",
    )


# ----- report ---------------------------------------------------------------------------------


def throughput_table(results: list[RunResult]) -> str:
    rows = []
    for r in results:
        rows.append(
            [
                r.system,
                r.wall_s,
                r.useful_tokens,
                r.generated_tokens,
                r.tokens_per_s,
                percentile(r.ttft_s, 50) * 1e3,
                percentile(r.ttft_s, 99) * 1e3,
                percentile(r.tpot_s, 50) * 1e3,
                percentile(r.tpot_s, 99) * 1e3,
                r.cpu_s,
                r.useful_tokens / r.cpu_s,
            ]
        )
    headers = [
        "system",
        "wall s",
        "output tok",
        "computed tok",
        "output tok/s",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "TPOT p50 ms",
        "TPOT p99 ms",
        "CPU s",
        "output tok/CPU s",
    ]
    return markdown_table(headers, rows)


def decode_table(step: DecodeStep, weight_bytes: int, bandwidths: list[Bandwidth]) -> str:
    read_gbps = max(b.read_gbps for b in bandwidths)
    copy_gbps = max(b.copy_gbps for b in bandwidths)
    step_ms = statistics.median(step.step_s) * 1e3
    forward_ms = statistics.median(step.forward_s) * 1e3 if step.forward_s else float("nan")
    bound_read_ms = weight_bytes / (read_gbps * 1e9) * 1e3
    bound_copy_ms = weight_bytes / (copy_gbps * 1e9) * 1e3
    rows = [
        ["weights read per decode step", f"{weight_bytes / 1e6:.1f} MB"],
        ["read bandwidth, sum() (best)", f"{read_gbps:.1f} GB/s"],
        ["copy bandwidth, copy_() read+write (best)", f"{copy_gbps:.1f} GB/s"],
        ["bound = weights / read bandwidth", f"{bound_read_ms:.2f} ms"],
        ["(bound with the copy figure instead)", f"{bound_copy_ms:.2f} ms"],
        [
            f"FlowServe batch-1 decode step, {step.context_len} ctx (p50 / min)",
            f"{step_ms:.2f} / {min(step.step_s) * 1e3:.2f} ms",
        ],
        ["  of which the model forward (p50)", f"{forward_ms:.2f} ms"],
        ["step / bound", f"{step_ms / bound_read_ms:.2f}x"],
        ["forward / bound", f"{forward_ms / bound_read_ms:.2f}x"],
    ]
    return markdown_table(["batch-1 decode", "value"], rows)


# ----- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="catalog name or model directory")
    parser.add_argument("--quick", action="store_true", help="16 shorter requests, fewer configs")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--hf-batch-sizes", default=None, help="comma-separated, e.g. 16,64")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (FlowServe and transformers)")
    parser.add_argument(
        "--dtype", default="", help="float32 or bfloat16, both systems (default: the device's)"
    )
    parser.add_argument("--step-token-budget", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-transformers", action="store_true")
    return parser.parse_args(argv)


def resolve(model: str) -> Path:
    as_path = Path(model).expanduser()
    if as_path.is_dir():
        return as_path
    if find_catalog_model(model) is None:
        raise SystemExit(f"{model!r} is neither a model directory nor a catalog model")
    return pull_model(model, default_cache_dir(), progress=progress)


@dataclass(frozen=True, slots=True)
class Plan:
    """What one run measures: workload shape, transformers batch sizes, decode probe length."""

    num_requests: int
    prompt_range: tuple[int, int]
    output_range: tuple[int, int]
    hf_batch_sizes: list[int]
    decode_tokens: int


def make_plan(args: argparse.Namespace) -> Plan:
    if args.quick:
        plan = Plan(16, (16, 256), (16, 64), [8, 16], 32)
    else:
        # bs=64 was tried too: a 64 x 491 padded prefill made it 3-4x slower than bs=16.
        plan = Plan(64, (16, 512), (16, 128), [8, 16], 64)
    if args.requests:
        plan = dataclasses.replace(plan, num_requests=args.requests)
    if args.hf_batch_sizes:
        sizes = [int(s) for s in args.hf_batch_sizes.split(",")]
        plan = dataclasses.replace(plan, hf_batch_sizes=sizes)
    return plan


# Bandwidth probe, then a short batch-1 decode, this many times (each a paired ratio).
DECODE_ROUNDS = 4


@dataclass(slots=True)
class FlowServeFigures:
    """Everything measured on FlowServe in one engine lifetime."""

    run: RunResult
    rounds: list[DecodeStep]  # batch-1 decode rounds
    weight_bytes: int
    bandwidths: list[Bandwidth]  # one per round, before its decode
    dtype: torch.dtype

    @property
    def decode(self) -> DecodeStep:
        """Every round's steps together."""
        return DecodeStep(
            context_len=self.rounds[0].context_len,
            step_s=[s for r in self.rounds for s in r.step_s],
            forward_s=[s for r in self.rounds for s in r.forward_s],
        )


def paired_bound_ratios(
    rounds: list[DecodeStep], bandwidths: list[Bandwidth], weight_bytes: int
) -> list[float]:
    """Each round's median step over its own bound (weights / the read bandwidth measured just
    before it)."""
    if len(rounds) != len(bandwidths):
        raise ValueError(f"{len(rounds)} decode rounds but {len(bandwidths)} bandwidth probes")
    return [
        statistics.median(step.step_s) / (weight_bytes / (bw.read_gbps * 1e9))
        for step, bw in zip(rounds, bandwidths, strict=True)
    ]


def bench_flowserve(
    model_dir: Path, settings: FlowServeSettings, workload: Workload, plan: Plan, vocab_size: int
) -> tuple[FlowServeFigures, Workload, Any]:
    """Throughput run, then the batch-1 decode probe between two bandwidth probes."""
    engine, tokenizer, _ = build_engine(model_dir, settings, tp_size=1)
    try:
        runner = engine.core.executor.runner  # type: ignore[attr-defined]
        weight_bytes = decode_weight_bytes(runner.model.weights)
        device = runner.device
        progress(f"flowserve: engine up ({settings.kv_cache_blocks} KV blocks); warming up")
        warm = make_workload(4, (16, 64), (4, 8), vocab_size, seed=12345)
        run_flowserve(engine, warm, "warm")
        progress("flowserve: throughput run")
        run = run_flowserve(engine, workload, "bench")
        progress(f"flowserve: {run.tokens_per_s:.1f} output tok/s")
        # Each round: bandwidth, then a short decode that sees the same host load. Probes run
        # on the model's own thread: on CPU a second thread doing heavy torch work brings its
        # own OpenMP team, which would slow the forward it is compared with.
        executor = engine.core.executor
        probe = getattr(executor, "run_on_forward_thread", lambda fn, *a: fn(*a))
        per_round = max(12, plan.decode_tokens // DECODE_ROUNDS)
        bandwidths, rounds = [], []
        for index in range(DECODE_ROUNDS):
            bandwidths.append(probe(measure_bandwidth, weight_bytes, device))
            rounds.append(measure_decode_step(engine, 100, per_round, vocab_size))
            progress(
                f"flowserve: batch-1 decode round {index + 1}/{DECODE_ROUNDS}: "
                f"{bandwidths[-1].read_gbps:.1f} GB/s, step p50 "
                f"{statistics.median(rounds[-1].step_s) * 1e3:.2f} ms"
            )
        figures = FlowServeFigures(run, rounds, weight_bytes, bandwidths, runner.dtype)
    finally:
        engine.shutdown()
    return figures, warm, tokenizer


def bench_transformers(
    model_dir: Path,
    workload: Workload,
    warm: Workload,
    plan: Plan,
    device: torch.device,
    dtype: torch.dtype,
    pad_id: int,
) -> list[RunResult]:
    model = load_transformers(model_dir, device, dtype)
    run_transformers(model, warm, 4, device, pad_id, log=lambda _line: None)
    results = []
    for size in plan.hf_batch_sizes:
        progress(f"transformers: batch size {size}")
        results.append(run_transformers(model, workload, size, device, pad_id))
        progress(f"transformers bs={size}: {results[-1].tokens_per_s:.1f} output tok/s")
    return results


def print_report(
    plan: Plan,
    model_dir: Path,
    device: torch.device,
    flowserve: FlowServeFigures,
    transformers_runs: list[RunResult],
    dram: Bandwidth,
    load: tuple[float, float],
) -> None:
    print(
        f"\n## FlowServe vs transformers: {plan.num_requests} requests, prompts "
        f"{plan.prompt_range[0]}-{plan.prompt_range[1]} tok, outputs {plan.output_range[0]}-"
        f"{plan.output_range[1]} tok, {model_dir.name}, {device}, "
        f"{torch.get_num_threads()} threads, {flowserve.dtype}"
    )
    print(f"(1-min load average {load[0]:.1f} at the start, {load[1]:.1f} at the end)")
    if max(load) > (os.cpu_count() or 1):
        print("WARNING: other processes competed for the CPUs; wall-clock figures are unreliable")
    print()
    run = flowserve.run
    print(throughput_table([run, *transformers_runs]))
    if transformers_runs:
        best = max(transformers_runs, key=lambda r: r.tokens_per_s)
        ratio = run.tokens_per_s / best.tokens_per_s
        cpu_ratio = (run.useful_tokens / run.cpu_s) / (best.useful_tokens / best.cpu_s)
        met = "met" if ratio >= THROUGHPUT_GOAL else "NOT met"
        print(
            f"\nthroughput FlowServe / best transformers ({best.system}): {ratio:.2f}x "
            f"(goal >= {THROUGHPUT_GOAL:g}x: {met}); per CPU second: {cpu_ratio:.2f}x"
        )
    print()
    decode = flowserve.decode
    print(decode_table(decode, flowserve.weight_bytes, flowserve.bandwidths))
    read_gbps = max(b.read_gbps for b in flowserve.bandwidths)
    bound_s = flowserve.weight_bytes / (read_gbps * 1e9)
    pooled = statistics.median(decode.step_s) / bound_s
    paired = paired_bound_ratios(flowserve.rounds, flowserve.bandwidths, flowserve.weight_bytes)
    step_ratio = statistics.median(paired)
    met = "met" if step_ratio <= DECODE_BOUND_GOAL else "NOT met"
    print(
        f"\ndecode step (p50) / bandwidth bound, median of {len(paired)} paired rounds: "
        f"{step_ratio:.2f}x [{min(paired):.2f}-{max(paired):.2f}] "
        f"(goal <= {DECODE_BOUND_GOAL:g}x: {met}); all steps against the best bandwidth: "
        f"{pooled:.2f}x, fastest step {min(decode.step_s) / bound_s:.2f}x"
    )
    print(
        f"(read bandwidth over a {dram.nbytes / 1e6:.0f} MB buffer, beyond the caches: "
        f"{dram.read_gbps:.1f} GB/s sum, {dram.copy_gbps:.1f} GB/s copy)"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        configure_intraop_threads(args.threads)
    load_start = os.getloadavg()[0]
    device = torch.device(args.device)
    plan = make_plan(args)
    model_dir = resolve(args.model)
    config = ModelConfig.from_model_dir(model_dir)
    workload = make_workload(
        plan.num_requests, plan.prompt_range, plan.output_range, config.vocab_size, args.seed
    )
    settings = FlowServeSettings(
        device=args.device, dtype=args.dtype, max_num_seqs=max(64, plan.num_requests)
    )
    if args.step_token_budget:
        settings.step_token_budget = args.step_token_budget
    # Room for every request at once, plus the warm-up and decode probes: no preemption.
    settings.kv_cache_blocks = 64 + sum(
        -(-(len(p) + n) // settings.block_size)
        for p, n in zip(workload.prompts, workload.output_lens, strict=True)
    )
    prompt_lens = [len(p) for p in workload.prompts]
    progress(
        f"model {model_dir.name}, {torch.get_num_threads()} threads, device {device}; "
        f"{plan.num_requests} requests, prompts {min(prompt_lens)}-{max(prompt_lens)} tok "
        f"(total {sum(prompt_lens)}), outputs {min(workload.output_lens)}-"
        f"{max(workload.output_lens)} tok (total {workload.num_output_tokens})"
    )

    flowserve, warm, tokenizer = bench_flowserve(
        model_dir, settings, workload, plan, config.vocab_size
    )
    gc.collect()
    # A buffer well beyond any cache, for the record.
    dram = measure_bandwidth(4 * flowserve.weight_bytes, device, repeats=4)
    progress(f"bandwidth over {dram.nbytes / 1e6:.0f} MB: {dram}")
    transformers_runs = []
    if not args.skip_transformers:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        transformers_runs = bench_transformers(
            model_dir, workload, warm, plan, device, flowserve.dtype, pad_id
        )
    load = (load_start, os.getloadavg()[0])
    print_report(plan, model_dir, device, flowserve, transformers_runs, dram, load)


if __name__ == "__main__":
    main()
