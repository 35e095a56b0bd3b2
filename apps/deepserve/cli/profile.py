"""`deepserve profile MODEL`: measures the PD cost model on this machine and stores the heatmap.

Builds the model's engine in this process, times prefills of several prompt lengths (a linear
fit gives the fixed and per-token cost), times decode steps of a full interference batch, takes
the KV bytes per token from the model's shape and the hand-off bandwidth from a memory copy (or
the flag for a real interconnect), then writes the resulting heatmap to etcd, where every
scheduler picks it up by watch.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from deepserve.scheduler.heatmap import CostModel, HeatmapRecord, build_heatmap, heatmaps
from deepserve.store.etcd import EtcdStore


async def _timed_generate(
    engine: Any, request_id: str, prompt: list[int], max_tokens: int
) -> float:
    from deepserve.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    started = time.perf_counter()
    async for _ in engine.generate(request_id, prompt, params):
        pass
    return time.perf_counter() - started


def _fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least squares y = a + b x; returns (a, b) with both clamped at >= 0."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    b = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    return max(mean_y - b * mean_x, 0.0), max(b, 0.0)


async def measure(
    engine: Any,
    *,
    max_model_len: int,
    kv_bytes_per_token: float,
    prompt_lengths: Sequence[int] = (32, 64, 128, 256, 512),
    decode_batch: int = 8,
    decode_tokens: int = 32,
    repeats: int = 3,
    transfer_bytes_per_s: float | None = None,
) -> CostModel:
    """Times prefill and decode on a started engine and returns the fitted cost model."""
    lengths = [n for n in prompt_lengths if n + 2 <= max_model_len] or [max_model_len // 2]
    seq = 0
    samples: list[tuple[int, float]] = []
    for n in lengths:
        times = []
        for _ in range(repeats):
            seq += 1
            # Distinct tokens per run so the prefix cache cannot shortcut the prefill.
            prompt = [3 + (seq * 31 + i * 7) % 200 for i in range(n)]
            times.append(await _timed_generate(engine, f"profile-p{seq}", prompt, 1))
        samples.append((n, statistics.median(times)))
    fixed, per_token = _fit_line([n for n, _ in samples], [t for _, t in samples])
    # Decode: a batch decoding together; the step time is the wall time per generated token.
    steps = max(1, min(decode_tokens, max_model_len - 10))
    started = time.perf_counter()
    await asyncio.gather(
        *(
            _timed_generate(engine, f"profile-d{i}", [3 + i, 5, 7, 9], steps)
            for i in range(decode_batch)
        )
    )
    decode_step = (time.perf_counter() - started) / steps
    bandwidth = transfer_bytes_per_s or _memcpy_bandwidth()
    free_tokens = (decode_step - fixed) / per_token if per_token > 0 else 0.0
    return replace(
        CostModel(),
        prefill_s_per_token=per_token,
        prefill_fixed_s=fixed,
        decode_step_s=decode_step,
        kv_bytes_per_token=kv_bytes_per_token,
        transfer_bytes_per_s=bandwidth,
        interference_batch=float(decode_batch),
        free_prefill_tokens=min(max(free_tokens, 0.0), 4096.0),
    )


def _memcpy_bandwidth(num_bytes: int = 64 * 1024 * 1024) -> float:
    """Host memory copy bandwidth: the hand-off speed of two pods on one machine."""
    import torch

    src = torch.empty(num_bytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    started = time.perf_counter()
    for _ in range(3):
        dst.copy_(src)
    return 3 * num_bytes / (time.perf_counter() - started)


def kv_bytes_per_token(model_dir: Path, dtype_bytes: int = 2) -> float:
    from deepserve.flowserve.model.config import ModelConfig

    config = ModelConfig.from_model_dir(model_dir)
    return float(2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype_bytes)


async def profile_model(
    model: str,
    model_dir: Path,
    *,
    device: str = "",
    transfer_bytes_per_s: float | None = None,
    prompt_lengths: Sequence[int] = (32, 64, 128, 256, 512),
    decode_batch: int = 8,
) -> HeatmapRecord:
    """Builds the engine, measures, and returns the profiled heatmap for `model`."""
    from deepserve.flowserve.pod.engine_builder import build_engine
    from deepserve.flowserve.settings import FlowServeSettings

    settings = FlowServeSettings(device=device, max_num_seqs=max(decode_batch, 1))
    engine, _tokenizer, max_model_len = await asyncio.to_thread(
        build_engine, model_dir, settings, 1
    )
    try:
        cost = await measure(
            engine,
            max_model_len=max_model_len,
            kv_bytes_per_token=kv_bytes_per_token(model_dir),
            prompt_lengths=prompt_lengths,
            decode_batch=decode_batch,
            transfer_bytes_per_s=transfer_bytes_per_s,
        )
    finally:
        await asyncio.to_thread(engine.shutdown)
    return build_heatmap(model, cost, source="profiled")


async def store_heatmap(etcd_endpoint: str, record: HeatmapRecord) -> None:
    async with EtcdStore(etcd_endpoint) as etcd:
        await heatmaps(etcd).put(record.model, record)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="catalog name or model directory")
    parser.add_argument("--etcd", default=None, help="etcd endpoint (default: from the run dir)")
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument("--device", default="", help="npu, cuda or cpu (default: best available)")
    parser.add_argument(
        "--transfer-gbps",
        type=float,
        default=0.0,
        help="KV hand-off bandwidth in GB/s (default: measured host memory copy)",
    )
    parser.add_argument("--decode-batch", type=int, default=8)
    parser.add_argument("--dry-run", action="store_true", help="print the heatmap, store nothing")


async def run(args: argparse.Namespace, etcd_endpoint: str) -> int:
    from deepserve.models.catalog import default_cache_dir, resolve_model

    model_dir = resolve_model(args.model, default_cache_dir())
    print(f"profiling {args.model} ({model_dir}) ...", flush=True)
    record = await profile_model(
        args.model,
        model_dir,
        device=args.device,
        transfer_bytes_per_s=args.transfer_gbps * 1e9 if args.transfer_gbps else None,
        decode_batch=args.decode_batch,
    )
    for name, value in record.cost_model.items():
        print(f"  {name:<22} {value:.6g}")
    print(record.render())
    if args.dry_run:
        return 0
    await store_heatmap(etcd_endpoint, record)
    print(f"stored under the heatmaps of etcd {etcd_endpoint}; schedulers use it at once")
    return 0
