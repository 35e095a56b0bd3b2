"""PD disaggregation (1 prefill + 1 decode instance) vs 2 colocated instances, in one run.

Both setups use the same two `python -m deepserve.flowserve` processes (one thread each, so the
same cores and process count): "colocated" sends each request to the less loaded of the two;
"pd" sends it to instance B with instance A as its prefill instance (KV crosses over the
transport the pair picks: shared memory here, same host). Prompts are random tokens, so no
prefix is reused between requests or runs.

Workloads, Poisson arrivals at a rate set from a calibration of this machine (the same
requests, prompts and arrival times in both setups):
  (a) long prompts (1-2k tokens), short outputs (8-32 tokens);
  (b) mixed: prompts 64-1024, outputs 16-128.
Reported per workload: TTFT and TPOT at p50/p99 and goodput at the stated SLO. The heatmap
buckets every request of both workloads by (prompt length, output/prompt ratio) and compares
the two setups on those same requests: SLO attainment, then mean end-to-end latency.

KV transfer bandwidth: a KV-sized tensor through each transport (gRPC bytes over 127.0.0.1,
shared memory) against memcpy bandwidth, all measured in this run; plus the hand-off bandwidth
the decode instance saw during the pd runs.

    .venv/bin/python -m bench.pd            # default model (smollm2-135m), ~8 min on 2 cores
    .venv/bin/python -m bench.pd --quick    # a tiny random model: checks the pipeline in ~1 min
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch

from bench.common import markdown_table, percentile, progress
from deepserve.cluster.state_stores import start_etcd, start_redis_server
from deepserve.flowserve.transfer.chunks import split_by_blocks
from deepserve.flowserve.transfer.shared_memory import SharedMemoryPool
from deepserve.flowserve.transfer.wire import chunk_from_proto, chunk_to_proto
from deepserve.processes import ManagedProcess, free_port, wait_for_port
from deepserve.v1 import common_pb2, flowserve_pb2, flowserve_pb2_grpc

BLOCK_SIZE = 16


@dataclass(frozen=True, slots=True)
class Workload:
    """A request mix: prompt and output length ranges, request count, offered load."""

    name: str
    prompt: tuple[int, int]
    output: tuple[int, int]
    num_requests: int
    # Offered load as a fraction of ONE instance's estimated capacity: the pd setup has a
    # single prefill instance, so both setups stay below saturation at the same rate.
    load: float = 0.8


@dataclass(slots=True)
class Result:
    """One request as the client saw it."""

    prompt_tokens: int
    output_tokens: int
    max_tokens: int = 0
    ttft_s: float = float("nan")
    tpot_s: float = float("nan")
    error: str = ""


@dataclass(slots=True)
class Calibration:
    """Isolated single-request speed of one instance on this machine."""

    prefill_tokens_per_s: float
    tpot_s: float

    def ttft_s(self, prompt_tokens: int) -> float:
        return prompt_tokens / self.prefill_tokens_per_s

    def service_s(self, prompt_tokens: float, output_tokens: float) -> float:
        # Decode steps batch across requests; a quarter of a step per token is a rough share.
        return self.ttft_s(int(prompt_tokens)) + 0.25 * output_tokens * self.tpot_s


@dataclass(slots=True)
class Slo:
    """Per-request SLO, scaled from the calibration: stated in the report."""

    ttft_factor: float
    ttft_floor_s: float
    tpot_factor: float
    tpot_floor_s: float

    def met(self, r: Result, cal: Calibration) -> bool:
        if r.error:
            return False
        ttft_ok = r.ttft_s <= max(self.ttft_floor_s, self.ttft_factor * cal.ttft_s(r.prompt_tokens))
        tpot_ok = r.output_tokens <= 1 or r.tpot_s <= max(
            self.tpot_floor_s, self.tpot_factor * cal.tpot_s
        )
        return ttft_ok and tpot_ok


@dataclass(slots=True)
class RunSummary:
    """Figures of one (workload, setup) run."""

    workload: str
    setup: str
    requests: int
    errors: int
    duration_s: float
    ttft_p50: float
    ttft_p99: float
    tpot_p50: float
    tpot_p99: float
    slo_attained: float
    goodput_rps: float
    extra: dict[str, Any] = field(default_factory=dict)


# ----- processes ------------------------------------------------------------------------------


def start_pods(model: str, run_dir: Path, kv_blocks: int) -> tuple[list[ManagedProcess], list[str]]:
    etcd_port, peer_port, redis_port = free_port(), free_port(), free_port()
    procs = [
        start_etcd(run_dir / "etcd", "127.0.0.1", etcd_port, peer_port, run_dir / "etcd.log"),
        start_redis_server(run_dir / "redis", "127.0.0.1", redis_port, run_dir / "redis.log"),
    ]
    for port in (etcd_port, redis_port):
        if not wait_for_port("127.0.0.1", port, 30):
            raise RuntimeError("etcd or the Redis-protocol server did not start")
    addresses = []
    for role in ("prefill", "decode"):
        port = free_port()
        env = dict(os.environ)
        env.update(
            {
                "DEEPSERVE_ETCD_ENDPOINT": f"127.0.0.1:{etcd_port}",
                "DEEPSERVE_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                "DEEPSERVE_FLOWSERVE_GRPC_PORT": str(port),
                "DEEPSERVE_FLOWSERVE_POD_ID": f"bench-{role}",
                "DEEPSERVE_FLOWSERVE_MODEL": model,
                "DEEPSERVE_FLOWSERVE_ROLE": role,
                "DEEPSERVE_FLOWSERVE_DEVICE": "cpu",
                "DEEPSERVE_FLOWSERVE_KV_CACHE_BLOCKS": str(kv_blocks),
                "DEEPSERVE_FLOWSERVE_BLOCK_SIZE": str(BLOCK_SIZE),
                "DEEPSERVE_FLOWSERVE_STEP_TOKEN_BUDGET": "2048",
                "OMP_NUM_THREADS": "1",
            }
        )
        procs.append(
            ManagedProcess(
                f"flowserve-{role}",
                [sys.executable, "-m", "deepserve.flowserve"],
                run_dir / f"{role}.log",
                env=env,
            ).start()
        )
        addresses.append(f"127.0.0.1:{port}")
    return procs, addresses


async def wait_ready(stubs: Sequence[flowserve_pb2_grpc.FlowServeServiceStub]) -> None:
    deadline = time.monotonic() + 300
    for stub in stubs:
        while True:
            try:
                stats = await stub.GetStats(flowserve_pb2.GetStatsRequest(), timeout=5)
                if stats.ready:
                    break
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("instances never became ready")
            await asyncio.sleep(0.3)


async def wait_idle(stubs: Sequence[flowserve_pb2_grpc.FlowServeServiceStub]) -> None:
    for stub in stubs:
        for _ in range(600):
            s = await stub.GetStats(flowserve_pb2.GetStatsRequest(), timeout=5)
            if s.running_requests == 0 and s.waiting_requests == 0:
                break
            await asyncio.sleep(0.1)


# ----- load -------------------------------------------------------------------------------------


def make_requests(
    workload: Workload, rate: float, rng: random.Random, vocab: int
) -> list[tuple[float, list[int], int]]:
    arrivals = []
    t = 0.0
    for _ in range(workload.num_requests):
        t += rng.expovariate(rate)
        length = rng.randint(*workload.prompt)
        prompt = [rng.randrange(100, vocab) for _ in range(length)]
        arrivals.append((t, prompt, rng.randint(*workload.output)))
    return arrivals


async def one_request(
    stub: flowserve_pb2_grpc.FlowServeServiceStub,
    request_id: str,
    prompt: list[int],
    max_tokens: int,
    prefill_address: str,
    timeout_s: float,
) -> Result:
    result = Result(len(prompt), 0, max_tokens)
    request = flowserve_pb2.GenerateRequest(
        request_id=request_id,
        prompt_token_ids=prompt,
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
        prefill_address=prefill_address,
    )
    started = time.monotonic()
    first = last = started
    try:
        async for reply in stub.Generate(request, timeout=timeout_s):
            if reply.token_ids:
                now = time.monotonic()
                if result.output_tokens == 0:
                    first = now
                last = now
                result.output_tokens += len(reply.token_ids)
    except grpc.aio.AioRpcError as exc:
        result.error = f"{exc.code().name}: {exc.details()}"
        return result
    result.ttft_s = first - started
    if result.output_tokens > 1:
        result.tpot_s = (last - first) / (result.output_tokens - 1)
    return result


async def run_load(
    setup: str,
    requests: list[tuple[float, list[int], int]],
    stubs: Sequence[flowserve_pb2_grpc.FlowServeServiceStub],
    addresses: Sequence[str],
    tag: str,
    timeout_s: float,
) -> tuple[list[Result], float]:
    in_flight = [0, 0]
    turn = 0

    async def send(i: int, at: float, prompt: list[int], max_tokens: int) -> Result:
        nonlocal turn
        await asyncio.sleep(max(0.0, at - (time.monotonic() - start)))
        if setup == "pd":
            return await one_request(
                stubs[1], f"{tag}-{i}", prompt, max_tokens, addresses[0], timeout_s
            )
        # Least loaded (client-side in-flight count), ties alternating.
        turn ^= 1
        target = min((0, 1), key=lambda k: (in_flight[k], k != turn))
        in_flight[target] += 1
        try:
            return await one_request(stubs[target], f"{tag}-{i}", prompt, max_tokens, "", timeout_s)
        finally:
            in_flight[target] -= 1

    start = time.monotonic()
    results = await asyncio.gather(*(send(i, *req) for i, req in enumerate(requests)))
    return list(results), time.monotonic() - start


def summarize(
    workload: str, setup: str, results: list[Result], duration: float, slo: Slo, cal: Calibration
) -> RunSummary:
    ok = [r for r in results if not r.error]
    ttft = [r.ttft_s for r in ok]
    tpot = [r.tpot_s for r in ok if r.output_tokens > 1]
    met = sum(slo.met(r, cal) for r in results)
    return RunSummary(
        workload=workload,
        setup=setup,
        requests=len(results),
        errors=len(results) - len(ok),
        duration_s=duration,
        ttft_p50=percentile(ttft, 50),
        ttft_p99=percentile(ttft, 99),
        tpot_p50=percentile(tpot, 50),
        tpot_p99=percentile(tpot, 99),
        slo_attained=met / len(results) if results else 0.0,
        goodput_rps=met / duration if duration else 0.0,
        extra={"errors": sorted({r.error for r in results if r.error})},
    )


async def calibrate(
    stub: flowserve_pb2_grpc.FlowServeServiceStub, vocab: int, length: int
) -> Calibration:
    rng = random.Random(1)
    await one_request(stub, "warmup", [rng.randrange(100, vocab) for _ in range(64)], 4, "", 600)
    prompt = [rng.randrange(100, vocab) for _ in range(length)]
    r = await one_request(stub, "calibrate", prompt, 17, "", 600)
    return Calibration(prefill_tokens_per_s=length / r.ttft_s, tpot_s=r.tpot_s)


# ----- transports -------------------------------------------------------------------------------


class _ChunkStreamer(flowserve_pb2_grpc.FlowServeServiceServicer):
    """Streams precomputed KV chunks as a Prefill reply (the transfer path minus the engine)."""

    def __init__(self, chunks: list[flowserve_pb2.KVChunk]) -> None:
        self.chunks = chunks

    async def Prefill(self, request: Any, context: Any) -> Any:
        for chunk in self.chunks:
            yield flowserve_pb2.PrefillResponse(kv=chunk)


async def transport_bandwidth(kv_shape: tuple[int, ...], repeats: int) -> dict[str, float]:
    """GB/s of moving one prompt's KV into a destination tensor, per transport."""
    src = torch.randn(kv_shape)
    dst = torch.empty_like(src)
    nbytes = src.numel() * src.element_size()
    figures: dict[str, float] = {"kv_bytes": float(nbytes)}

    def best(fn: Any) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return nbytes / min(times) / 1e9

    figures["memcpy_gbps"] = best(lambda: dst.copy_(src))
    pool = SharedMemoryPool(Path("/dev/shm"), ttl_s=60)

    def via_shm() -> None:
        for chunk in split_by_blocks(src, 0, 4 << 20):
            back = chunk_from_proto(chunk_to_proto(chunk, pool))
            dst.narrow(2, back.first_block, back.num_blocks).copy_(back.tensor)

    figures["shared_memory_gbps"] = best(via_shm)

    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", 64 << 20),
        ]
    )
    chunks = [chunk_to_proto(c) for c in split_by_blocks(src, 0, 4 << 20)]
    flowserve_pb2_grpc.add_FlowServeServiceServicer_to_server(_ChunkStreamer(chunks), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    times = []
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 << 20)]
    ) as channel:
        stub = flowserve_pb2_grpc.FlowServeServiceStub(channel)
        for _ in range(repeats):
            t = time.perf_counter()
            async for reply in stub.Prefill(flowserve_pb2.PrefillRequest()):
                back = chunk_from_proto(reply.kv)
                dst.narrow(2, back.first_block, back.num_blocks).copy_(back.tensor)
            times.append(time.perf_counter() - t)
    await server.stop(0)
    figures["grpc_bytes_gbps"] = nbytes / min(times) / 1e9
    assert torch.equal(dst, src)
    return figures


# ----- main -------------------------------------------------------------------------------------


def model_and_shape(args: argparse.Namespace, work_dir: Path) -> tuple[str, int, tuple[int, ...]]:
    """Model path, vocabulary size, and the KV host shape of a 1024-token prompt."""
    if args.quick:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.tiny_model import make_tiny_llama

        path = make_tiny_llama(work_dir / "tiny-llama")
    else:
        from deepserve.models.catalog import default_cache_dir, resolve_model

        path = resolve_model(args.model, default_cache_dir())
    config = json.loads((Path(path) / "config.json").read_text())
    kv_heads = config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    shape = (config["num_hidden_layers"], 2, 1024 // BLOCK_SIZE, BLOCK_SIZE, kv_heads, head_dim)
    return str(path), int(config["vocab_size"]), shape


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    work_dir = Path(tempfile.mkdtemp(prefix="bench-pd-"))
    model, vocab, kv_shape = model_and_shape(args, work_dir)
    scale = (0.5 if args.quick else 1.0) * args.requests_scale
    # The quick model's context is 512 tokens: every length shrinks 8x.
    k = 8 if args.quick else 1
    workloads = [
        Workload(
            "long-prompt/short-output",
            (1024 // k, 2048 // k),
            (8, 32),
            max(3, round(6 * scale)),
        ),
        Workload("mixed", (64 // k, 1024 // k), (16, 128), max(6, round(14 * scale))),
    ]
    slo = Slo(ttft_factor=3.0, ttft_floor_s=0.5, tpot_factor=2.0, tpot_floor_s=0.02)
    procs, addresses = start_pods(model, work_dir, kv_blocks=1024)
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    stubs = [flowserve_pb2_grpc.FlowServeServiceStub(c) for c in channels]
    try:
        progress(f"pods starting: {addresses} (model {model})")
        await wait_ready(stubs)
        cal = await calibrate(stubs[0], vocab, 512 // k)
        progress(
            f"calibration: prefill {cal.prefill_tokens_per_s:.0f} tok/s, TPOT {cal.tpot_s * 1e3:.0f} ms"
        )
        transfer = await transport_bandwidth(kv_shape, repeats=3 if args.quick else 5)
        progress(f"transports: {transfer}")
        rng = random.Random(args.seed)
        runs: list[RunSummary] = []
        paired: list[tuple[Result, Result]] = []
        for workload in workloads:
            mean_prompt = sum(workload.prompt) / 2
            mean_output = sum(workload.output) / 2
            rate = workload.load / cal.service_s(mean_prompt, mean_output)
            requests = make_requests(workload, rate, rng, vocab)
            outcome: dict[str, list[Result]] = {}
            for setup in ("colocated", "pd"):
                await wait_idle(stubs)
                before = await stubs[1].GetStats(flowserve_pb2.GetStatsRequest(), timeout=5)
                results, duration = await run_load(
                    setup, requests, stubs, addresses, f"{workload.name}-{setup}", args.timeout
                )
                outcome[setup] = results
                summary = summarize(workload.name, setup, results, duration, slo, cal)
                summary.extra["rate_rps"] = rate
                if setup == "pd":
                    after = await stubs[1].GetStats(flowserve_pb2.GetStatsRequest(), timeout=5)
                    summary.extra.update(_handoff(before.kv_received, after.kv_received))
                runs.append(summary)
                progress(
                    f"{workload.name} {setup}: TTFT p50 {summary.ttft_p50:.2f}s, "
                    f"goodput {summary.goodput_rps:.3f} req/s ({summary.slo_attained:.0%})"
                )
            paired.extend(zip(outcome["colocated"], outcome["pd"], strict=True))
        heatmap = heatmap_cells(paired, slo, cal)
        for cell in heatmap:
            progress(f"heatmap cell: {cell}")
        return {
            "model": model,
            "calibration": asdict(cal),
            "slo": asdict(slo),
            "transfer": transfer,
            "runs": [asdict(r) for r in runs],
            "heatmap": heatmap,
        }
    finally:
        for channel in channels:
            await channel.close()
        for proc in reversed(procs):
            proc.stop()


PROMPT_BUCKETS = (0, 512, 1024, 1 << 30)
RATIO_BUCKETS = (0.0, 1 / 16, 1 / 4, float("inf"))


def _bucket(value: float, edges: Sequence[float]) -> int:
    return next(i for i in range(len(edges) - 1) if edges[i] <= value < edges[i + 1])


def _e2e(r: Result) -> float:
    if r.error or r.output_tokens == 0:
        return float("nan")
    return r.ttft_s + (r.output_tokens - 1) * (r.tpot_s if r.output_tokens > 1 else 0.0)


def heatmap_cells(
    paired: list[tuple[Result, Result]], slo: Slo, cal: Calibration
) -> list[dict[str, Any]]:
    """Per (prompt length, output/prompt ratio) bucket: both setups on the same requests."""
    cells: dict[tuple[int, int], list[tuple[Result, Result]]] = {}
    for colocated, pd in paired:
        key = (
            _bucket(colocated.prompt_tokens, PROMPT_BUCKETS),
            _bucket(colocated.max_tokens / colocated.prompt_tokens, RATIO_BUCKETS),
        )
        cells.setdefault(key, []).append((colocated, pd))
    out = []
    for (p, q), pairs in sorted(cells.items()):
        met = {
            name: sum(slo.met(pair[i], cal) for pair in pairs) / len(pairs)
            for i, name in enumerate(("colocated", "pd"))
        }
        e2e = {
            name: sum(_e2e(pair[i]) for pair in pairs) / len(pairs)
            for i, name in enumerate(("colocated", "pd"))
        }
        wins = met["pd"] > met["colocated"] or (
            met["pd"] == met["colocated"] and e2e["pd"] < e2e["colocated"]
        )
        out.append(
            {
                "prompt_tokens": f"[{PROMPT_BUCKETS[p]}, {min(PROMPT_BUCKETS[p + 1], 4096)})",
                "ratio": f"[{RATIO_BUCKETS[q]:.3g}, {RATIO_BUCKETS[q + 1]:.3g})",
                "requests": len(pairs),
                "colocated_slo": met["colocated"],
                "pd_slo": met["pd"],
                "colocated_e2e_s": e2e["colocated"],
                "pd_e2e_s": e2e["pd"],
                "disaggregate": wins,
            }
        )
    return out


def _handoff(before: Any, after: Any) -> dict[str, float]:
    nbytes = after.bytes - before.bytes
    seconds = after.transfer_seconds - before.transfer_seconds
    return {
        "handoffs": after.transfers - before.transfers,
        "handoff_failures": after.failures - before.failures,
        "handoff_bytes": nbytes,
        "handoff_gbps": nbytes / seconds / 1e9 if seconds > 0 else float("nan"),
        "handoff_shared_memory": after.shared_memory - before.shared_memory,
    }


def report(results: dict[str, Any]) -> str:
    slo = results["slo"]
    cal = results["calibration"]
    lines = [
        f"model: {results['model']}; calibration (one instance, one thread): prefill "
        f"{cal['prefill_tokens_per_s']:.0f} tok/s, TPOT {cal['tpot_s'] * 1e3:.0f} ms",
        f"SLO per request: TTFT <= max({slo['ttft_floor_s']} s, {slo['ttft_factor']} x isolated "
        f"TTFT of its prompt), TPOT <= max({slo['tpot_floor_s']} s, {slo['tpot_factor']} x "
        "isolated TPOT)",
        "",
        markdown_table(
            [
                "workload",
                "setup",
                "req",
                "err",
                "rate/s",
                "TTFT p50",
                "TTFT p99",
                "TPOT p50",
                "TPOT p99",
                "SLO met",
                "goodput/s",
                "hand-off GB/s",
            ],
            [
                [
                    r["workload"],
                    r["setup"],
                    r["requests"],
                    r["errors"],
                    r["extra"]["rate_rps"],
                    r["ttft_p50"],
                    r["ttft_p99"],
                    r["tpot_p50"],
                    r["tpot_p99"],
                    f"{r['slo_attained']:.0%}",
                    r["goodput_rps"],
                    r["extra"].get("handoff_gbps", float("nan")),
                ]
                for r in results["runs"]
            ],
        ),
        "",
        "KV transfer of a 1024-token prompt's KV "
        f"({results['transfer']['kv_bytes'] / 1e6:.1f} MB) into a destination tensor:",
        markdown_table(
            ["path", "GB/s"],
            [
                ["memcpy", results["transfer"]["memcpy_gbps"]],
                [
                    "shared memory (segment write + map + copy)",
                    results["transfer"]["shared_memory_gbps"],
                ],
                ["gRPC bytes over 127.0.0.1", results["transfer"]["grpc_bytes_gbps"]],
            ],
        ),
    ]
    if results["heatmap"]:
        lines += [
            "",
            "Heatmap over the same requests in both setups (disaggregate = pd attains the SLO "
            "more often, or as often with lower mean end-to-end latency):",
            markdown_table(
                [
                    "prompt",
                    "output/prompt",
                    "req",
                    "colocated SLO",
                    "pd SLO",
                    "colocated e2e s",
                    "pd e2e s",
                    "disaggregate",
                ],
                [
                    [
                        c["prompt_tokens"],
                        c["ratio"],
                        c["requests"],
                        f"{c['colocated_slo']:.0%}",
                        f"{c['pd_slo']:.0%}",
                        c["colocated_e2e_s"],
                        c["pd_e2e_s"],
                        c["disaggregate"],
                    ]
                    for c in results["heatmap"]
                ],
            ),
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, fewer requests")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests-scale", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=300.0, help="per-request limit (s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    # A SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so the pods and stores are stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    results = asyncio.run(bench(args))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    print(report(results))


if __name__ == "__main__":
    main()
