"""Multi-LoRA serving on the default model, in one run (issue #18).

(a) Mixed batch: 64 requests (32 prompt tokens, 32 generated), 8 rank-16 adapters (every
    projection) spread over them
    round-robin, all submitted at once to one engine, against the same 64 requests on the base
    model alone. Output tokens per second of wall time and per CPU second of this process (a
    shared, oversubscribed host moves wall time far more than CPU time, as bench/structured
    found); base and LoRA runs alternate (`--rounds` pairs, fresh prompts each round, so no run
    hits another's prefix cache) and each ratio is the median of the rounds' ratios. The
    adapters are resident before the LoRA runs (their cold load is measured in (b)).
(b) Cold load: on an idle engine, a request for an adapter the engine never saw (rank 16,
    files in the page cache) against a request for a resident one: the difference in time to
    first token is the load on the request's timeline (files read off the engine loop into host
    DRAM, copied into a device slot between two steps). The read alone is also reported.
(c) Fine-tune -> first token: `deepserve up` with the default model deployed, a fine-tuning
    job through the OpenAI API; the `ft:` model is requested every 50 ms from the start, and
    the figure is the first streamed token's time minus the job's success time (jobmgr's
    stamp in etcd). No new instance: the base deployment serves the adapter.

    .venv/bin/python -m bench.lora              # all three
    .venv/bin/python -m bench.lora --skip-finetune
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import markdown_table, progress
from deepserve.flowserve.engine.async_engine import AsyncEngine
from deepserve.flowserve.pod.engine_builder import build_engine
from deepserve.flowserve.runner.cpu_threads import configure_intraop_threads
from deepserve.flowserve.settings import FlowServeSettings
from deepserve.jobs.fine_tuning import fine_tuned_model_name
from deepserve.jobs.store import JobStore
from deepserve.models.catalog import DEFAULT_MODEL, default_cache_dir, resolve_model
from deepserve.sampling_params import SamplingParams
from deepserve.store.etcd import EtcdStore
from tests.cluster_harness import local_cluster
from tests.lora_adapters import write_synthetic_adapter

RANK = 16


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    # Ordinary token ids (well inside the vocabulary, no special tokens).
    return [torch.randint(100, 20000, (length,), generator=generator).tolist() for _ in range(n)]


async def run_one(
    engine: AsyncEngine, rid: str, prompt: list[int], max_tokens: int, adapter: tuple[str, str]
) -> tuple[int, float, float]:
    """(output tokens, time to first token, end) of one request; times are perf_counter."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    started = time.perf_counter()
    first = 0.0
    count = 0
    async for out in engine.generate(
        rid, prompt, params, adapter=adapter[0], adapter_path=adapter[1]
    ):
        if out.new_token_ids and not first:
            first = time.perf_counter() - started
        count += len(out.new_token_ids)
    return count, first, time.perf_counter()


async def workload(
    engine: AsyncEngine,
    tag: str,
    batch: list[list[int]],
    max_tokens: int,
    adapters: list[tuple[str, str]],
) -> tuple[float, float]:
    """Output tokens per wall second and per CPU second of the whole batch submitted at once."""
    started = time.perf_counter()
    cpu_started = time.process_time()
    results = await asyncio.gather(
        *(
            run_one(
                engine,
                f"{tag}-{i}",
                p,
                max_tokens,
                adapters[i % len(adapters)] if adapters else ("", ""),
            )
            for i, p in enumerate(batch)
        )
    )
    tokens = sum(r[0] for r in results)
    cpu = time.process_time() - cpu_started
    return tokens / (max(r[2] for r in results) - started), tokens / cpu


async def mixed_batch(
    engine: AsyncEngine, adapters: list[tuple[str, str]], args: argparse.Namespace
) -> dict[str, Any]:
    # Warm-up: compile paths, fault pages in, and make the adapters resident.
    warm = prompts(8, args.prompt_tokens, seed=1000)
    await workload(engine, "warm-base", warm, 4, [])
    await workload(engine, "warm-lora", warm, 4, adapters)
    rounds = []
    for r in range(args.rounds):
        batch = prompts(args.requests, args.prompt_tokens, seed=r)
        base = await workload(engine, f"base{r}", batch, args.max_tokens, [])
        lora = await workload(engine, f"lora{r}", batch, args.max_tokens, adapters)
        progress(
            f"[lora] round {r}: base {base[0]:.1f} tok/s ({base[1]:.1f}/CPU s), "
            f"{len(adapters)} adapters {lora[0]:.1f} tok/s ({lora[1]:.1f}/CPU s)"
        )
        rounds.append((base, lora))
    return {
        "base_tok_s": [b[0] for b, _ in rounds],
        "lora_tok_s": [lo[0] for _, lo in rounds],
        "base_tok_per_cpu_s": [b[1] for b, _ in rounds],
        "lora_tok_per_cpu_s": [lo[1] for _, lo in rounds],
        "ratio_wall": statistics.median(lo[0] / b[0] for b, lo in rounds),
        "ratio_cpu": statistics.median(lo[1] / b[1] for b, lo in rounds),
    }


async def cold_load(engine: AsyncEngine, work: Path, base_dir: Path, n: int) -> dict[str, Any]:
    resident = write_synthetic_adapter(base_dir, work / "resident", rank=RANK, seed=100)
    await run_one(
        engine, "resident-warm", prompts(1, 32, seed=5)[0], 2, ("bench/resident", str(resident))
    )
    cold_ttft, warm_ttft, reads = [], [], []
    for i in range(n):
        path = write_synthetic_adapter(base_dir, work / f"cold{i}", rank=RANK, seed=200 + i)
        fresh = prompts(2, 32, seed=300 + i)
        _, warm, _ = await run_one(engine, f"w{i}", fresh[0], 2, ("bench/resident", str(resident)))
        read_ms: list[float] = []

        async def cold(
            i: int = i,
            path: Path = path,
            prompt: list[int] = fresh[1],
            read_ms: list[float] = read_ms,
        ) -> float:
            params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
            started = time.perf_counter()
            first = 0.0
            async for out in engine.generate(
                f"c{i}", prompt, params, adapter=f"bench/cold{i}", adapter_path=str(path)
            ):
                if out.new_token_ids and not first:
                    first = time.perf_counter() - started
                if out.timeline is not None and out.timeline.adapter_load is not None:
                    start_ns, end_ns = out.timeline.adapter_load
                    read_ms.append((end_ns - start_ns) / 1e6)
            return first

        cold_ttft.append(await cold())
        warm_ttft.append(warm)
        reads.extend(read_ms)
    deltas = [1000 * (c - w) for c, w in zip(cold_ttft, warm_ttft, strict=True)]
    return {
        "cold_load_ms": statistics.median(deltas),
        "cold_load_ms_all": deltas,
        "read_ms": statistics.median(reads) if reads else float("nan"),
        "warm_ttft_ms": 1000 * statistics.median(warm_ttft),
        "cold_ttft_ms": 1000 * statistics.median(cold_ttft),
        "adapter_mb": sum(f.stat().st_size for f in resident.iterdir()) / 1e6,
    }


def finetune_to_first_token(work: Path) -> dict[str, Any]:
    import openai

    cache = work / "models"
    cache.mkdir()
    (cache / DEFAULT_MODEL).symlink_to(default_cache_dir() / DEFAULT_MODEL)
    os.environ["DEEPSERVE_MODEL_CACHE"] = str(cache)
    os.environ["DEEPSERVE_FILES_ROOT"] = str(work / "files")
    progress("[lora] starting deepserve up with the default model")
    with local_cluster(work / "run", model=DEFAULT_MODEL, timeout_s=300) as cluster:
        client = openai.OpenAI(
            base_url=f"{cluster.layout.gateway_url}/v1", api_key="EMPTY", max_retries=0
        )
        rows = [
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Name fact {i}."},
                        {"role": "assistant", "content": f"Fact {i} is that owls fly at night."},
                    ]
                }
            )
            for i in range(12)
        ]
        file_id = client.files.create(
            file=("ft.jsonl", io.BytesIO(("\n".join(rows) + "\n").encode())), purpose="fine-tune"
        ).id
        job = client.fine_tuning.jobs.create(
            model=DEFAULT_MODEL,
            training_file=file_id,
            suffix="bench",
            hyperparameters={"n_epochs": 1, "batch_size": 4},
        )
        name = fine_tuned_model_name(DEFAULT_MODEL, "bench", job.id)
        progress(f"[lora] job {job.id}; requesting {name} every 50 ms")
        deadline = time.monotonic() + 900
        first_token_at = 0.0
        attempts = 0
        while not first_token_at:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} was never served")
            attempts += 1
            try:
                stream = client.chat.completions.create(
                    model=name,
                    messages=[{"role": "user", "content": "Name fact 3."}],
                    max_tokens=4,
                    stream=True,
                )
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        first_token_at = time.time()
                        break
                stream.close()
            except openai.NotFoundError:
                time.sleep(0.05)
            if attempts % 200 == 0:
                status = client.fine_tuning.jobs.retrieve(job.id).status
                if status in ("failed", "cancelled"):
                    raise RuntimeError(f"the job ended {status}")

        async def record() -> Any:
            async with EtcdStore(cluster.layout.etcd_endpoint) as etcd:
                return (await JobStore(etcd).get(job.id)).record

        job_record = asyncio.run(record())
        assert job_record.fine_tuning is not None
        finished = job_record.fine_tuning.progress.finished_at
        assert finished is not None
        instances = asyncio.run(_count_instances(cluster.layout.etcd_endpoint))
    return {
        "success_to_first_token_s": first_token_at - finished,
        "instances_after": instances,
    }


async def _count_instances(endpoint: str) -> int:
    from deepserve import records

    async with EtcdStore(endpoint) as etcd:
        found, _ = await records.instances(etcd).list()
        return len(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    # One forward thread: on a shared, oversubscribed host every op of a 2-thread OpenMP team
    # waits at a barrier for a descheduled thread, which charges per op rather than per FLOP.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cold-loads", type=int, default=5)
    parser.add_argument("--skip-finetune", action="store_true")
    args = parser.parse_args()
    base_dir = resolve_model(DEFAULT_MODEL, default_cache_dir())
    configure_intraop_threads(args.threads)
    load_before = os.getloadavg()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        work = Path(tmp)
        adapters = [
            (
                f"bench/a{i}",
                str(write_synthetic_adapter(base_dir, work / f"a{i}", rank=RANK, seed=i)),
            )
            for i in range(args.adapters)
        ]
        settings = FlowServeSettings(kv_cache_memory_mb=768, max_num_seqs=args.requests)
        engine, _, _ = build_engine(base_dir, settings, tp_size=1)
        try:
            progress("[lora] (a) mixed batch")
            results["mixed"] = asyncio.run(mixed_batch(engine, adapters, args))
            progress("[lora] (b) cold load")
            results["cold"] = asyncio.run(cold_load(engine, work, base_dir, args.cold_loads))
        finally:
            engine.shutdown()
        if not args.skip_finetune:
            progress("[lora] (c) fine-tune success -> first token")
            results["finetune"] = finetune_to_first_token(work)
    results["loadavg"] = {"before": load_before, "after": os.getloadavg()}
    results["threads"] = args.threads
    mixed, cold = results["mixed"], results["cold"]
    rows: list[list[object]] = [
        [
            f"{args.requests} requests, {args.adapters} adapters (rank {RANK}) vs base, per CPU s",
            f"{mixed['ratio_cpu']:.3f}x throughput",
            ">= 0.8x",
            "base "
            + ", ".join(f"{v:.1f}" for v in mixed["base_tok_per_cpu_s"])
            + " / LoRA "
            + ", ".join(f"{v:.1f}" for v in mixed["lora_tok_per_cpu_s"])
            + " tok per CPU s",
        ],
        [
            "same, per wall second",
            f"{mixed['ratio_wall']:.3f}x throughput",
            ">= 0.8x",
            "base "
            + ", ".join(f"{v:.1f}" for v in mixed["base_tok_s"])
            + " / LoRA "
            + ", ".join(f"{v:.1f}" for v in mixed["lora_tok_s"])
            + " tok/s",
        ],
        [
            f"adapter cold load (rank {RANK}, {cold['adapter_mb']:.1f} MB)",
            f"{cold['cold_load_ms']:.1f} ms",
            "< 100 ms",
            f"TTFT cold {cold['cold_ttft_ms']:.1f} vs resident {cold['warm_ttft_ms']:.1f} ms; "
            f"file read {cold['read_ms']:.1f} ms",
        ],
    ]
    if "finetune" in results:
        ft = results["finetune"]
        rows.append(
            [
                "fine-tune success -> first token of its adapter",
                f"{ft['success_to_first_token_s']:.2f} s",
                "< 2 s",
                f"instances after: {ft['instances_after']} (the base deployment only)",
            ]
        )
    print(json.dumps(results, indent=2, default=str))
    print()
    print(markdown_table(["measure", "result", "goal", "detail"], rows))
    print(
        f"\nload average before {load_before[0]:.2f}, after {results['loadavg']['after'][0]:.2f}; "
        f"{results['threads']} torch threads"
    )


if __name__ == "__main__":
    main()
