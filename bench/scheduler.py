"""The scheduler (Algorithm 1) in one run: decision rate, and routing quality on real engines.

Part 1, decision rate: one scheduler process (`python -m deepserve.scheduler`) over 64 live
instances registered in etcd, with load reports in Redis and a global prefix index of 10,000
block hashes fed through the instances' KV-event streams. A client process drives Route RPCs
(prompt hash chains of 20-24 blocks) at a fixed concurrency; the figure is decisions per second
of that one scheduler. The in-process cost of one decision (Router.route, no RPC) is shown too.

Part 2, routing quality: FlowServe pods serving a small random Llama, and a shared-prefix
workload (a few long system prompts, each followed by a short unique question). The same
workload, with fresh prefixes per policy so no policy inherits another's cache, runs under
Algorithm 1 (deepserve), round-robin and least-loaded (each selected per deployment through
the job record the scheduler watches). Reported: prefix-cache hit rate (cached prompt tokens /
prompt tokens, from the engines' usage) and mean / p90 time to first token (Route included).

    .venv/bin/python -m bench.scheduler            # the full run
    .venv/bin/python -m bench.scheduler --quick    # a smaller one
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench.common import markdown_table, percentile, progress
from deepserve import records
from deepserve.cluster.state_stores import start_etcd, start_redis_server
from deepserve.jobs.records import JobPhase, JobRecord, RoutingPolicy, ServingSpec
from deepserve.jobs.store import JobStore
from deepserve.prefix_hash import prompt_block_hashes
from deepserve.processes import ManagedProcess, free_port, wait_for_port
from deepserve.records import InstanceRecord, Role
from deepserve.rpc.client import insecure_channel
from deepserve.rpc.health_check import wait_serving
from deepserve.store.etcd import EtcdStore
from deepserve.store.keys import Keys
from deepserve.store.redis_messages import KVEventEntry, LoadReport
from deepserve.store.redis_store import RedisStore
from deepserve.v1 import (
    common_pb2,
    flowserve_pb2,
    flowserve_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

# Block size of part 1's simulated instances; part 2 hashes with what the real pods register.
BLOCK = 16


@dataclass
class Stores:
    etcd_endpoint: str
    redis_url: str
    run_dir: Path


@contextmanager
def stores(run_dir: Path) -> Iterator[Stores]:
    etcd_port, peer, redis_port = free_port(), free_port(), free_port()
    etcd = start_etcd(run_dir / "etcd", "127.0.0.1", etcd_port, peer, run_dir / "etcd.log")
    redis = start_redis_server(run_dir / "redis", "127.0.0.1", redis_port, run_dir / "redis.log")
    try:
        for port in (etcd_port, redis_port):
            if not wait_for_port("127.0.0.1", port, 30):
                raise RuntimeError(f"store on port {port} did not start")
        yield Stores(f"127.0.0.1:{etcd_port}", f"redis://127.0.0.1:{redis_port}/0", run_dir)
    finally:
        redis.stop()
        etcd.stop()


def service_env(s: Stores, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "DEEPSERVE_ETCD_ENDPOINT": s.etcd_endpoint,
        "DEEPSERVE_REDIS_URL": s.redis_url,
        "DEEPSERVE_LEASE_TTL_S": "5",
        "DEEPSERVE_LOG_LEVEL": "WARNING",
        **extra,
    }


@contextmanager
def scheduler_process(s: Stores) -> Iterator[str]:
    port = free_port()
    proc = ManagedProcess(
        "scheduler",
        [sys.executable, "-m", "deepserve.scheduler"],
        s.run_dir / "scheduler.log",
        env=service_env(s, DEEPSERVE_SCHEDULER_GRPC_PORT=str(port)),
    ).start()
    address = f"127.0.0.1:{port}"
    try:
        if not asyncio.run(wait_serving(address, 60)):
            raise RuntimeError(f"scheduler did not start:\n{proc.tail()}")
        yield address
    finally:
        proc.stop()


async def scheduler_stats(address: str) -> scheduler_pb2.GetSchedulerStatsResponse:
    async with insecure_channel(address, traced=False) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        return await stub.GetSchedulerStats(scheduler_pb2.GetSchedulerStatsRequest())


# --- part 1: decision rate ----------------------------------------------------------------


@dataclass
class RateResult:
    instances: int
    index_blocks: int
    concurrency: int
    decisions: int
    seconds: float
    in_process_us: float
    branches: dict[str, int]

    @property
    def per_s(self) -> float:
        return self.decisions / self.seconds


async def seed_instances(s: Stores, n: int, chains: list[list[str]], rng: random.Random) -> None:
    """n instances (etcd), a load report each (Redis), and the chains spread over them."""
    async with EtcdStore(s.etcd_endpoint) as etcd, RedisStore(s.redis_url) as redis:
        lease = await etcd.grant_lease(600)
        ids = [f"inst-{i:03d}" for i in range(n)]
        for instance_id in ids:
            await records.instances(etcd).put(
                instance_id,
                InstanceRecord(
                    instance_id=instance_id,
                    model="bench",
                    role=Role.COLOCATED,
                    address="127.0.0.1:1",
                    pod_id=f"pod-{instance_id}",
                    block_size=BLOCK,
                ),
                lease_id=lease.id,
            )
            await redis.publish_load(
                instance_id,
                LoadReport(
                    at=time.time(),
                    model="bench",
                    running=rng.randint(0, 4),
                    waiting=rng.randint(0, 2),
                    kv_blocks_used=rng.randint(0, 500),
                    kv_blocks_total=1000,
                ),
                ttl_s=3600,
            )
        held: dict[str, list[str]] = {i: [] for i in ids}
        for chain in chains:
            for instance_id in rng.sample(ids, rng.randint(1, 3)):
                held[instance_id].extend(chain)
        for instance_id, hashes in held.items():
            events = [
                KVEventEntry(kind="stored", tier="device", hashes=tuple(hashes[i : i + 64]))
                for i in range(0, len(hashes), 64)
            ]
            await redis.append_kv_events(instance_id, events)
        # The lease is deliberately not revoked: the instances live until the stores stop.


def make_chains(num_blocks: int, blocks_per_chain: int, rng: random.Random) -> list[list[str]]:
    chains = []
    for c in range(num_blocks // blocks_per_chain):
        tokens = [rng.randrange(3, 250) for _ in range(blocks_per_chain * BLOCK)]
        chains.append(prompt_block_hashes(tokens, BLOCK))
        del c
    return chains


async def drive_routes(
    address: str, requests: list[scheduler_pb2.RouteRequest], concurrency: int
) -> float:
    """Sends every request with `concurrency` in flight; returns the seconds it took."""
    async with insecure_channel(address, traced=False) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        await stub.Route(requests[0])  # warm the channel
        queue = iter(requests)

        async def worker() -> None:
            for request in queue:
                await stub.Route(request)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started


def route_requests(
    chains: list[list[str]], n: int, rng: random.Random
) -> list[scheduler_pb2.RouteRequest]:
    out = []
    for i in range(n):
        chain = rng.choice(chains)
        extra = [f"{rng.getrandbits(64):016x}" for _ in range(rng.randint(0, 4))]
        out.append(
            scheduler_pb2.RouteRequest(
                request_id=f"rate-{i}",
                model="bench",
                tenant=f"t{i % 8}",
                prompt_tokens=(len(chain) + len(extra)) * BLOCK,
                max_tokens=rng.choice([16, 64, 256]),
                prefix_block_hashes=chain + extra,
                block_size=BLOCK,
            )
        )
    return out


def in_process_decision_us(chains: list[list[str]], n_instances: int, rng: random.Random) -> float:
    """Microseconds per Router.route over the same shape of state, without RPC or Redis."""
    from deepserve.scheduler.decode_predictor import DecodeLengthPredictor
    from deepserve.scheduler.heatmap_table import HeatmapTable
    from deepserve.scheduler.instance_table import RoleGroups
    from deepserve.scheduler.load_tracker import InstanceLoad, LoadTracker
    from deepserve.scheduler.policy_table import PolicyTable
    from deepserve.scheduler.prefix_index import PrefixIndex
    from deepserve.scheduler.router import RouteFacts, Router

    instances = [
        InstanceRecord(
            instance_id=f"i{i:03d}",
            model="bench",
            role=Role.COLOCATED,
            address="a",
            pod_id="p",
            block_size=BLOCK,
        )
        for i in range(n_instances)
    ]

    groups = RoleGroups.of(instances)

    class Table:
        def groups(self, model: str) -> RoleGroups:
            return groups

    loads = LoadTracker(None, lambda: [i.instance_id for i in instances])
    loads.set_loads({i.instance_id: InstanceLoad(running=rng.randint(0, 4)) for i in instances})
    index = PrefixIndex()
    for chain in chains:
        for inst in rng.sample(instances, rng.randint(1, 3)):
            index.store(inst.instance_id, chain)
    router = Router(
        Table(), loads, index, DecodeLengthPredictor(), HeatmapTable(None),
        PolicyTable(None, RoutingPolicy.DEEPSERVE),
    )  # fmt: skip
    facts = [
        RouteFacts(f"r{i}", "bench", prompt_tokens=384, max_tokens=64,
                   prefix_block_hashes=rng.choice(chains), block_size=BLOCK)
        for i in range(5000)
    ]  # fmt: skip
    started = time.perf_counter()
    for f in facts:
        router.route(f)
    return (time.perf_counter() - started) / len(facts) * 1e6


def run_rate(
    s: Stores, *, instances: int, blocks: int, requests: int, concurrency: int
) -> RateResult:
    rng = random.Random(0)
    chains = make_chains(blocks, 20, rng)
    asyncio.run(seed_instances(s, instances, chains, rng))
    with scheduler_process(s) as address:

        async def indexed() -> scheduler_pb2.GetSchedulerStatsResponse:
            deadline = time.monotonic() + 60
            while True:
                stats = await scheduler_stats(address)
                if stats.prefix_index_blocks >= blocks and stats.instances == instances:
                    return stats
                if time.monotonic() > deadline:
                    raise RuntimeError(f"index did not fill: {stats}")
                await asyncio.sleep(0.2)

        stats = asyncio.run(indexed())
        progress(f"scheduler sees {stats.instances} instances, {stats.prefix_index_blocks} blocks")
        reqs = route_requests(chains, requests, rng)
        seconds = asyncio.run(drive_routes(address, reqs, concurrency))
        after = asyncio.run(scheduler_stats(address))
    in_proc = in_process_decision_us(chains, instances, rng)
    return RateResult(
        instances=instances,
        index_blocks=stats.prefix_index_blocks,
        concurrency=concurrency,
        decisions=len(reqs),
        seconds=seconds,
        in_process_us=in_proc,
        branches=dict(after.decisions),
    )


# --- part 2: routing quality on real engines ----------------------------------------------


def make_model(path: Path) -> Path:
    """A small random Llama (4 layers, hidden 256): prefill costs enough for caching to show."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.tiny_model import make_tiny_llama  # tokenizer files

    make_tiny_llama(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(path, safe_serialization=True)
    return path


@contextmanager
def pods(s: Stores, model: Path, n: int, kv_blocks: int) -> Iterator[list[ManagedProcess]]:
    procs = [
        ManagedProcess(
            f"pod{i}",
            [sys.executable, "-m", "deepserve.flowserve"],
            s.run_dir / f"pod{i}.log",
            env=service_env(
                s,
                DEEPSERVE_FLOWSERVE_GRPC_PORT="0",
                DEEPSERVE_FLOWSERVE_MODEL=str(model),
                DEEPSERVE_FLOWSERVE_DEVICE="cpu",
                DEEPSERVE_FLOWSERVE_KV_CACHE_BLOCKS=str(kv_blocks),
                DEEPSERVE_FLOWSERVE_MAX_NUM_SEQS="4",
                DEEPSERVE_FLOWSERVE_LOAD_REPORT_INTERVAL_S="0.1",
                OMP_NUM_THREADS="1",
            ),
        ).start()
        for i in range(n)
    ]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.stop()


async def set_policy(s: Stores, model: str, policy: RoutingPolicy, seq: int) -> None:
    """A serving job for `model` naming the policy: the scheduler's policy table watches jobs.

    No jobmgr runs in this bench, so the job is written through the JobStore (jobmgr's own
    store in libs): created, then marked running by CAS, as jobmgr's reconciler would.
    """
    async with EtcdStore(s.etcd_endpoint) as etcd:
        jobs = JobStore(etcd)
        await etcd.delete_prefix(Keys.jobs_prefix())
        job = await jobs.create_serving(
            ServingSpec(model=model, replicas=0, policy=policy), job_id=f"bench-{seq}"
        )

        def running(record: JobRecord) -> JobRecord:
            record.status.phase = JobPhase.RUNNING
            return record

        await jobs.update(job.record.job_id, running)


@dataclass
class QualityResult:
    policy: str
    requests: int
    hit_rate: float
    mean_ttft_ms: float
    p90_ttft_ms: float
    seconds: float
    spread: dict[str, int]


async def run_policy(
    scheduler: str,
    model: str,
    policy: RoutingPolicy,
    *,
    prefixes: int,
    per_prefix: int,
    prefix_tokens: int,
    concurrency: int,
    seed: int,
    block_size: int,
) -> QualityResult:
    rng = random.Random(seed)
    systems = [[rng.randrange(3, 250) for _ in range(prefix_tokens)] for _ in range(prefixes)]
    prompts = [
        system + [rng.randrange(3, 250) for _ in range(24)]
        for system in systems
        for _ in range(per_prefix)
    ]
    rng.shuffle(prompts)
    ttfts: list[float] = []
    cached = total = 0
    spread: dict[str, int] = {}
    channels: dict[str, grpc.aio.Channel] = {}
    async with insecure_channel(scheduler, traced=False) as sched_channel:
        sched = scheduler_pb2_grpc.SchedulerServiceStub(sched_channel)
        queue = iter(enumerate(prompts))

        async def worker() -> None:
            nonlocal cached, total
            for n, prompt in queue:
                started = time.perf_counter()
                decision = await sched.Route(
                    scheduler_pb2.RouteRequest(
                        request_id=f"{policy.value}-{n}",
                        model=model,
                        prompt_tokens=len(prompt),
                        max_tokens=8,
                        prefix_block_hashes=prompt_block_hashes(prompt, block_size),
                        block_size=block_size,
                    )
                )
                target = decision.instances[0]
                spread[target.instance_id] = spread.get(target.instance_id, 0) + 1
                channel = channels.setdefault(
                    target.address, insecure_channel(target.address, traced=False)
                )
                stub = flowserve_pb2_grpc.FlowServeServiceStub(channel)
                first = None
                async for reply in stub.Generate(
                    flowserve_pb2.GenerateRequest(
                        request_id=f"{policy.value}-{n}",
                        prompt_token_ids=prompt,
                        sampling=common_pb2.SamplingParams(
                            temperature=0, max_tokens=8, ignore_eos=True
                        ),
                    )
                ):
                    if first is None and reply.token_ids:
                        first = time.perf_counter() - started
                    if reply.finish_reason:
                        cached += reply.usage.cached_tokens
                        total += reply.usage.prompt_tokens
                ttfts.append(first or 0.0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    for channel in channels.values():
        await channel.close()
    return QualityResult(
        policy=policy.value,
        requests=len(prompts),
        hit_rate=cached / total if total else 0.0,
        mean_ttft_ms=statistics.fmean(ttfts) * 1000,
        p90_ttft_ms=percentile(ttfts, 90) * 1000,
        seconds=seconds,
        spread=spread,
    )


def run_quality(
    s: Stores, *, n_pods: int, prefixes: int, per_prefix: int, prefix_tokens: int,
    concurrency: int, kv_blocks: int,
) -> list[QualityResult]:  # fmt: skip
    model = make_model(s.run_dir / "small-llama")
    model_name = str(model)
    results = []
    with pods(s, model, n_pods, kv_blocks) as procs, scheduler_process(s) as scheduler:

        async def all_live() -> int:
            """Waits for every pod's instance; returns the block size they cache with."""
            deadline = time.monotonic() + 180
            async with insecure_channel(scheduler, traced=False) as channel:
                stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
                while True:
                    found = await stub.ListInstances(
                        scheduler_pb2.ListInstancesRequest(model=model_name)
                    )
                    if len(found.instances) == n_pods:
                        return found.instances[0].block_size
                    if time.monotonic() > deadline or not all(p.alive() for p in procs):
                        raise RuntimeError("pods did not come up:\n" + procs[0].tail())
                    await asyncio.sleep(0.2)

        block_size = asyncio.run(all_live())
        progress(f"{n_pods} pods serving {model.name} (KV blocks of {block_size} tokens)")
        policies = [RoutingPolicy.DEEPSERVE, RoutingPolicy.ROUND_ROBIN, RoutingPolicy.LEAST_LOADED]
        for seq, policy in enumerate(policies):
            asyncio.run(set_policy(s, model_name, policy, seq))
            time.sleep(0.5)  # the scheduler's job watch picks the policy up
            result = asyncio.run(
                run_policy(
                    scheduler, model_name, policy, prefixes=prefixes, per_prefix=per_prefix,
                    prefix_tokens=prefix_tokens, concurrency=concurrency, seed=100 + seq,
                    block_size=block_size,
                )
            )  # fmt: skip
            progress(
                f"{policy.value}: hit rate {result.hit_rate:.1%}, "
                f"mean TTFT {result.mean_ttft_ms:.1f} ms, spread {sorted(result.spread.values())}"
            )
            results.append(result)
            time.sleep(1.0)  # let load reports settle between policies
    return results


# --- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run")
    parser.add_argument("--skip-quality", action="store_true", help="part 1 only")
    parser.add_argument("--concurrency", type=int, default=32, help="Route RPCs in flight")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-scheduler-") as tmp, stores(Path(tmp)) as s:
        progress("part 1: decision rate")
        rate = run_rate(
            s,
            instances=64,
            blocks=10_000,
            requests=4000 if args.quick else 20_000,
            concurrency=args.concurrency,
        )
        print("\n## Scheduler decision rate (one scheduler process, gRPC Route)\n")
        print(
            markdown_table(
                ["instances", "index blocks", "in flight", "decisions", "seconds", "decisions/s",
                 "in-process us/decision"],
                [[rate.instances, rate.index_blocks, rate.concurrency, rate.decisions,
                  rate.seconds, rate.per_s, rate.in_process_us]],
            )
        )  # fmt: skip
        print(f"\nbranches: {rate.branches}")
        if args.skip_quality:
            return
        progress("part 2: routing quality on real engines")
        quality = run_quality(
            s,
            n_pods=3 if args.quick else 4,
            prefixes=8 if args.quick else 16,
            per_prefix=6 if args.quick else 10,
            prefix_tokens=384,
            concurrency=4,
            kv_blocks=160,
        )
        print("\n## Shared-prefix workload on real engines (same run, fresh prefixes per policy)\n")
        print(
            markdown_table(
                ["policy", "requests", "prefix hit rate", "mean TTFT ms", "p90 TTFT ms",
                 "seconds", "requests per instance"],
                [[q.policy, q.requests, f"{q.hit_rate:.1%}", q.mean_ttft_ms, q.p90_ttft_ms,
                  q.seconds, " ".join(str(v) for v in sorted(q.spread.values()))]
                 for q in quality],
            )
        )  # fmt: skip


if __name__ == "__main__":
    main()
