"""Fast scaling in one run: time from "scale up" to a new instance's first token, four ways, and
a burst from 0 to N instances through the whole control plane.

Part 1, one instance of the model (default: smollm2-135m), median of `--reps` runs each:
  (a) cold: a new pod process (imports, device) that loads the weights from disk;
  (b) warm pod (runtime already up, no model), weights from disk;
  (c) warm pod, weights mapped from a DRAM copy in host shared memory;
  (d) warm pod, weights forked (streamed) from a running instance of the model.
Each is timed from the request to start the instance (process spawn or LoadModel) to the first
token of a 1-token request on it, and shown as a ratio to (a). Pods run on etcd + valkey
started here; the pod's own five-step timeline of the last run is printed too.

The fork's copy rate is shown beside a plain copy of the same bytes into fresh shared memory
(bench/fresh_copy.py) measured in the same rep: on one host that copy is the fork's limit.

Part 2, `deepserve up` with `--burst` warm pods forked from the pod zygote, the model pinned in
DRAM, and an autoscaled deployment at zero replicas: ScaleJob(0 -> N), then the time until every
instance has served a request (each one is sent a request the moment it registers); then, back
at zero, the time to first token of a request sent to the gateway (scale from zero: held,
autoscaled, loaded, released). `--reps` bursts on one cluster (the pool refilled between them),
reported as median and range.

Every run prints the CPU model and the load average, and refuses to start while other platform
processes run on the host (they share its cores) unless `--allow-busy`.

    .venv/bin/python -m bench.scaling                 # full run (3 reps, burst of 64)
    .venv/bin/python -m bench.scaling --quick         # 1 rep, burst of 16
    .venv/bin/python -m bench.scaling --burst-model tiny   # burst with a tiny random Llama
    .venv/bin/python -m bench.scaling --skip-single   # the burst only
    .venv/bin/python -m bench.scaling --allow-busy    # beside other platform processes

Part 1's pods run one CPU thread each (`--single-pod-threads`; 0 = all cores), the burst's too
(`--burst-pod-threads`): on a host loaded beyond its cores, OpenMP teams of two wait for
descheduled partners and every forward becomes seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.common import markdown_table, progress
from bench.fresh_copy import fresh_copy_gbps
from bench.machine import (
    cpu_seconds_by_role,
    cpu_spent,
    load_average,
    machine_line,
    platform_processes,
)
from deepserve.cluster.layout import ClusterLayout
from deepserve.cluster.state_stores import start_etcd, start_redis_server
from deepserve.models.catalog import default_cache_dir, resolve_model
from deepserve.processes import free_port, wait_for_port
from deepserve.rpc.client import insecure_channel
from deepserve.scaling.weights_cache import WeightsCacheLayout, rank_file_name
from deepserve.store.etcd import EtcdStore
from deepserve.store.keys import Keys
from deepserve.v1 import (
    common_pb2,
    flowserve_pb2,
    flowserve_pb2_grpc,
    jobmgr_pb2_grpc,
    podpool_pb2,
    podpool_pb2_grpc,
)
from deepserve.v1 import jobmgr_pb2 as jpb

KV_BLOCKS = "64"


@dataclass
class Stores:
    etcd: str
    redis: str
    root: Path


@contextlib.contextmanager
def stores() -> Iterator[Stores]:
    root = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    port, peer, rport = free_port(), free_port(), free_port()
    etcd = start_etcd(root / "etcd", "127.0.0.1", port, peer, root / "etcd.log")
    redis = start_redis_server(root / "redis", "127.0.0.1", rport, root / "redis.log")
    try:
        assert wait_for_port("127.0.0.1", port, 30) and wait_for_port("127.0.0.1", rport, 30)
        yield Stores(f"127.0.0.1:{port}", f"redis://127.0.0.1:{rport}/0", root)
    finally:
        etcd.stop()
        redis.stop()
        shutil.rmtree(root, ignore_errors=True)


class Pod:
    """A `python -m deepserve.flowserve` process on a known port."""

    def __init__(
        self,
        st: Stores,
        name: str,
        *,
        model: str = "",
        cache: Path,
        fork_shm: bool = True,
        use_cache: bool = False,
        preload: str = "",
        threads: int = 0,
    ) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.cache = cache
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "DEEPSERVE_ETCD_ENDPOINT": st.etcd,
            "DEEPSERVE_REDIS_URL": st.redis,
            "DEEPSERVE_FLOWSERVE_GRPC_PORT": str(self.port),
            "DEEPSERVE_FLOWSERVE_POD_ID": name,
            "DEEPSERVE_FLOWSERVE_MODEL": model,
            "DEEPSERVE_FLOWSERVE_KV_CACHE_BLOCKS": KV_BLOCKS,
            "DEEPSERVE_FLOWSERVE_WEIGHTS_CACHE_DIR": str(cache),
            # Only the DRAM pod sees the host's copy (it premaps it while warm, as pool pods do).
            "DEEPSERVE_FLOWSERVE_USE_WEIGHTS_CACHE": "true" if use_cache else "false",
            # false: fork over the gRPC stream even from this host (as across hosts).
            "DEEPSERVE_FLOWSERVE_FORK_SHARED_MEMORY": "true" if fork_shm else "false",
            # A warm pod of a pool that expects this model to scale loads its tokenizer early.
            "DEEPSERVE_FLOWSERVE_PRELOAD_TOKENIZERS": preload,
            # 0: one per core. Two OpenMP threads on a host loaded beyond its cores wait at
            # every barrier for a descheduled partner: a 1-token forward took 2-6 s at load 12.
            "DEEPSERVE_FLOWSERVE_THREADS": str(threads),
        }
        self.log = st.root / f"{name}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "deepserve.flowserve"], env=env, stdout=out, stderr=out
            )

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def wait_record(etcd: EtcdStore, prefix: str, match: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        kvs, _ = await etcd.list(prefix)
        if any(match in kv.value.decode() for kv in kvs):
            return
        await asyncio.sleep(0.005)
    raise TimeoutError(f"no record matching {match!r} under {prefix}")


async def first_token(address: str, model: str, request_id: str) -> None:
    async with insecure_channel(address, traced=False) as channel:
        stub = flowserve_pb2_grpc.FlowServeServiceStub(channel)
        request = flowserve_pb2.GenerateRequest(
            request_id=request_id,
            model=model,
            prompt_token_ids=[1, 2, 3, 4],
            sampling=common_pb2.SamplingParams(max_tokens=1, ignore_eos=True),
        )
        async for _ in stub.Generate(request, timeout=60):
            return


async def load(address: str, model: str, **weights: object) -> flowserve_pb2.LoadModelResponse:
    async with insecure_channel(address, traced=False) as channel:
        stub = flowserve_pb2_grpc.FlowServeServiceStub(channel)
        request = flowserve_pb2.LoadModelRequest(model=model, **weights)  # type: ignore[arg-type]
        return await stub.LoadModel(request, timeout=300)


async def unload(address: str) -> None:
    async with insecure_channel(address, traced=False) as channel:
        stub = flowserve_pb2_grpc.FlowServeServiceStub(channel)
        await stub.UnloadModel(flowserve_pb2.UnloadModelRequest(), timeout=60)


def steps_text(reply: flowserve_pb2.LoadModelResponse | None) -> str:
    if reply is None:
        return "(process start: no LoadModel)"
    parts = []
    for s in reply.steps:
        how = f" ({s.detail.split(';')[0]})" if s.step == "weights_loaded" else ""
        parts.append(f"{s.step} {s.seconds:.3f}s{how}")
    return ", ".join(parts)


def spread(values: list[float]) -> str:
    """Median and range, e.g. "6.08 (5.59-6.81)"."""
    if not values:
        return "-"
    return f"{statistics.median(values):.3g} ({min(values):.3g}-{max(values):.3g})"


GBPS = re.compile(r"([0-9.]+) GB/s")


@dataclass
class SingleInstance:
    """Part 1's measurements: seconds per path and rep, the last run's steps, copy rates."""

    times: dict[str, list[float]]
    steps: dict[str, str]
    fork_gbps: list[float]
    fresh_copy_gbps: list[float]

    def medians(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.times.items()}


async def part1(model: str, reps: int) -> tuple[dict[str, float], dict[str, str]]:
    """Part 1's medians and steps (see `single_instance` for everything it measures)."""
    result = await single_instance(model, reps, threads=0)
    return result.medians(), result.steps


async def single_instance(
    model: str, reps: int, *, threads: int = 1, shm_dir: Path = Path("/dev/shm")
) -> SingleInstance:
    """Part 1; `threads` per pod (0: one per core). The pods' weights caches and the DRAM copy
    live on `shm_dir` (tmpfs, as in production): on /tmp a fork wrote to a disk file system."""
    shm = shm_dir / f"bench-scaling-{os.getpid()}"
    try:
        return await _single_instance(model, reps, threads, shm)
    finally:
        shutil.rmtree(shm, ignore_errors=True)


async def _single_instance(model: str, reps: int, threads: int, shm: Path) -> SingleInstance:
    model_dir = resolve_model(model, default_cache_dir())
    times: dict[str, list[float]] = {k: [] for k in ("cold", "disk", "dram", "fork", "stream")}
    steps: dict[str, str] = {}
    fork_gbps: list[float] = []
    fresh_gbps: list[float] = []
    with stores() as st:
        async with EtcdStore(st.etcd) as etcd:
            dram_root = shm / "dram"
            progress("[scaling] preparing the DRAM copy")
            from deepserve.flowserve.model.prepared_weights import prepare_copy
            from deepserve.flowserve.runner.device import detect_platform

            entry = await asyncio.to_thread(
                prepare_copy, model, model_dir, WeightsCacheLayout(dram_root),
                dtype=detect_platform(None).default_dtype,
            )  # fmt: skip
            progress("[scaling] starting warm pods")
            warm = [
                Pod(st, f"warm-{i}", cache=shm / f"cache-{i}", preload=model, threads=threads)
                for i in range(2)
            ]
            warm.append(
                Pod(
                    st, "warm-dram", cache=dram_root, use_cache=True, preload=model, threads=threads
                )
            )
            warm.append(
                Pod(
                    st,
                    "warm-stream",
                    cache=shm / "cache-s",
                    fork_shm=False,
                    preload=model,
                    threads=threads,
                )
            )
            try:
                for pod in warm:
                    await wait_record(etcd, Keys.pods_prefix(), pod.address)
                source, target, dram_pod, stream_pod = warm
                await load(source.address, model)  # the running instance forks come from
                for rep in range(reps):
                    progress(f"[scaling] rep {rep + 1}/{reps}: cold")
                    started = time.monotonic()
                    cold = Pod(
                        st,
                        f"cold-{rep}",
                        model=model,
                        cache=shm / "cache-cold",
                        threads=threads,
                    )
                    try:
                        await wait_record(etcd, Keys.instances_prefix(), cold.address)
                        await first_token(cold.address, model, f"cold-{rep}")
                        times["cold"].append(time.monotonic() - started)
                    finally:
                        cold.stop()
                    for kind, pod, weights in (
                        ("disk", target, {"weights_source": common_pb2.WEIGHTS_SOURCE_DISK}),
                        ("dram", dram_pod, {"weights_source": common_pb2.WEIGHTS_SOURCE_DRAM,
                                            "weights_path": str(entry.path)}),
                        ("fork", target, {"weights_source": common_pb2.WEIGHTS_SOURCE_FORK,
                                          "fork_from": source.address}),
                        ("stream", stream_pod, {"weights_source": common_pb2.WEIGHTS_SOURCE_FORK,
                                                "fork_from": source.address}),
                    ):  # fmt: skip
                        progress(f"[scaling] rep {rep + 1}/{reps}: {kind}")
                        if kind != "dram":  # no copy left by a fork
                            shutil.rmtree(pod.cache, ignore_errors=True)
                        started = time.monotonic()
                        reply = await load(pod.address, model, **weights)
                        await first_token(pod.address, model, f"{kind}-{rep}")
                        times[kind].append(time.monotonic() - started)
                        steps[kind] = steps_text(reply)
                        await unload(pod.address)
                        if kind == "fork":
                            detail = next(
                                (s.detail for s in reply.steps if s.step == "weights_loaded"), ""
                            )
                            if found := GBPS.search(detail):
                                fork_gbps.append(float(found.group(1)))
                            # The same bytes, plainly copied into fresh shared memory, now.
                            rank_file = entry.path / rank_file_name(0, 1)
                            fresh_gbps.append(fresh_copy_gbps(rank_file)[1])
            finally:
                for pod in warm:
                    pod.stop()
    steps["cold"] = steps_text(None)
    return SingleInstance(times, steps, fork_gbps, fresh_gbps)


# --- part 2: burst through the control plane -------------------------------------------------


@contextlib.contextmanager
def cluster(
    run_dir: Path, warm_pods: int, pinned: str, cache: Path, pod_threads: int = 0
) -> Iterator[ClusterLayout]:
    env = {
        **os.environ,
        "DEEPSERVE_PODPOOL_MAX_PODS": str(warm_pods + 4),
        "DEEPSERVE_PODPOOL_POD_THREADS": str(pod_threads),
        # Pods packed many to a core: OpenMP teams (pod threads > 1) must not spin at barriers.
        "DEEPSERVE_PODPOOL_POD_OPENMP_SPIN_COUNT": "20000",
        "DEEPSERVE_PODPOOL_DRAM_MODELS": pinned,
        "DEEPSERVE_PODPOOL_WEIGHTS_CACHE_DIR": str(cache),
        "DEEPSERVE_FLOWSERVE_KV_CACHE_BLOCKS": KV_BLOCKS,
        "DEEPSERVE_FLOWSERVE_LOAD_REPORT_INTERVAL_S": "2",
        "DEEPSERVE_JOBMGR_AUTOSCALE_INTERVAL_S": "0.5",
        "DEEPSERVE_GATEWAY_SCALE_FROM_ZERO_TIMEOUT_S": "120",
        "DEEPSERVE_LOG_LEVEL": "WARNING",
    }
    argv = [sys.executable, "-m", "deepserve.cli.main", "up", "--free-ports", "--run-dir", str(run_dir),
            "--model", "none", "--warm-pods", str(warm_pods), "--lease-ttl", "5",
            "--pod-start", "zygote"]  # fmt: skip
    out = (
        (run_dir / "up.out").open("wb")
        if run_dir.mkdir(parents=True, exist_ok=True) is None
        else None
    )
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "cluster.json").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((run_dir / "up.out").read_text()[-3000:])
            time.sleep(0.2)
        yield ClusterLayout.load(run_dir)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
        if out is not None:
            out.close()


def cluster_pids(layout: ClusterLayout) -> list[int]:
    """The processes `deepserve up` started (stores, services; pods are under podpool)."""
    return list(json.loads(layout.state_file.read_text()).get("pids", {}).values())


async def wait_pool(
    layout: ClusterLayout, warm: int, timeout_s: float = 300, settle_s: float = 3.0
) -> None:
    """Until `warm` pods are warm and the DRAM copy is ready, then `settle_s` more: the state of
    a pool that has been up a little while (pods forked before the copy was ready premap it
    within their premap interval, 2 s)."""
    async with insecure_channel(layout.address("podpool"), traced=False) as channel:
        stub = podpool_pb2_grpc.PodPoolServiceStub(channel)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            reply = await stub.ListPods(podpool_pb2.ListPodsRequest())
            warm_now = sum(p.state == common_pb2.POD_STATE_WARM for p in reply.pods)
            if warm_now >= warm and any(c.ready for c in reply.dram_copies):
                await asyncio.sleep(settle_s)
                return
            await asyncio.sleep(0.5)
    raise TimeoutError("the pool did not fill or the DRAM copy is missing")


async def burst(
    layout: ClusterLayout, model: str, n: int, job_id: str = "burst"
) -> dict[str, float | str]:
    """One burst 0 -> n of a new autoscaled job, then back to zero and one request at zero."""
    results: dict[str, float | str] = {"load_average_1m": load_average()[0]}
    async with (
        insecure_channel(layout.address("jobmgr"), traced=False) as channel,
        EtcdStore(layout.etcd_endpoint) as etcd,
    ):
        jobs = jobmgr_pb2_grpc.JobManagerServiceStub(channel)
        spec = jpb.JobSpec(
            kind=jpb.JOB_KIND_SERVING,
            serving=jpb.ServingSpec(
                model=model, replicas=0, min_replicas=0, max_replicas=n,
                autoscaling=jpb.AutoscalingPolicy(enabled=True, scale_down_cooldown_s=3600),
            ),
        )  # fmt: skip
        await jobs.CreateJob(jpb.CreateJobRequest(spec=spec, job_id=job_id))
        progress(f"[scaling] burst 0 -> {n}")
        served: dict[str, float] = {}
        pending: set[asyncio.Task[None]] = set()
        roots = cluster_pids(layout)
        cpu_before = cpu_seconds_by_role(*roots)
        started = time.monotonic()
        await jobs.ScaleJob(jpb.ScaleJobRequest(job_id=job_id, replicas=n))

        async def serve_one(instance_id: str, address: str) -> None:
            await first_token(address, model, f"{job_id}-{instance_id}")
            served[instance_id] = time.monotonic() - started

        seen: set[str] = set()

        def on_instance(value: bytes) -> None:
            record = json.loads(value)
            if record.get("job_id") == job_id and record["instance_id"] not in seen:
                seen.add(record["instance_id"])
                pending.add(
                    asyncio.create_task(serve_one(record["instance_id"], record["address"]))
                )

        async def follow() -> None:
            # A watch, not polling: the harness should not spend the cores the burst needs.
            kvs, revision = await etcd.list(Keys.instances_prefix())
            for kv in kvs:
                on_instance(kv.value)
            async for event in etcd.watch_prefix(
                Keys.instances_prefix(), start_revision=revision + 1
            ):
                if event.kind == "put":
                    on_instance(event.value)
                if len(seen) >= n:
                    return

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(follow(), timeout=300)
        await asyncio.gather(*pending)
        if len(served) < n:
            raise TimeoutError(f"only {len(served)} of {n} instances served within 300s")
        spent = cpu_spent(cpu_before, cpu_seconds_by_role(*roots))
        results["cpu_s"] = sum(spent.values())
        results["cpu_by_process"] = ", ".join(f"{r} {s:.1f}" for r, s in spent.items())
        times = sorted(served.values())
        results["first_served_s"] = times[0]
        results["half_served_s"] = times[len(times) // 2]
        results["all_served_s"] = times[-1]
        tasks = (await jobs.GetJob(jpb.GetJobRequest(job_id=job_id))).tasks
        sources = [common_pb2.WeightsSource.Name(t.weights_source) for t in tasks]
        results["weights"] = ", ".join(
            f"{s.removeprefix('WEIGHTS_SOURCE_').lower()} x{sources.count(s)}"
            for s in sorted(set(sources))
        )
        load_s = [
            next((s.seconds for s in t.scale_steps if s.step == "weights_loaded"), 0.0)
            for t in tasks
        ]
        results["median_weights_loaded_s"] = statistics.median(load_s) if load_s else 0.0
        # engine_started happened before the burst (warm pods); the others are the burst's.
        medians = []
        for step in ("pod_acquired", "weights_loaded", "warmed_up", "visible"):
            seconds = [s.seconds for t in tasks for s in t.scale_steps if s.step == step]
            if seconds:
                medians.append(f"{step} {statistics.median(seconds):.3f}")
        results["median_steps"] = ", ".join(medians)

        progress("[scaling] back to zero")
        await jobs.ScaleJob(jpb.ScaleJobRequest(job_id=job_id, replicas=0))
        deadline = time.monotonic() + 300
        while (await jobs.GetJob(jpb.GetJobRequest(job_id=job_id))).tasks:
            if time.monotonic() > deadline:
                raise TimeoutError("the burst did not scale down")
            await asyncio.sleep(0.2)
        # Scale from zero as it is meant: a warm pool (refilled after the burst) and a DRAM copy.
        await wait_pool(layout, n)
        progress("[scaling] first request at zero replicas (through the gateway)")
        started = time.monotonic()
        async with httpx.AsyncClient(base_url=layout.gateway_url, timeout=300) as http:
            reply = await http.post(
                "/v1/completions",
                json={"model": model, "prompt": "Hello", "max_tokens": 1, "stream": True},
            )
            reply.raise_for_status()
        results["ttft_at_zero_s"] = time.monotonic() - started
        job = (await jobs.GetJob(jpb.GetJobRequest(job_id=job_id))).job
        results["from_zero_event"] = next(
            (e.message for e in reversed(job.events) if e.reason == "Autoscaled"), ""
        )
        # The next rep starts from an idle host: this job's instance goes.
        await jobs.DeleteJob(jpb.DeleteJobRequest(job_id=job_id))
    return results


def run_bursts(
    n: int, model: str, reps: int, *, shm_dir: Path = Path("/dev/shm"), pod_threads: int = 1
) -> tuple[float, list[dict[str, float | str]]]:
    """`reps` bursts of n on one `deepserve up` cluster (the pool refilled before each): the
    seconds the first pool fill took, and each burst's figures."""
    work = Path(tempfile.mkdtemp(prefix="bench-burst-"))
    cache = shm_dir / f"bench-burst-weights-{os.getpid()}"
    runs: list[dict[str, float | str]] = []
    try:
        if model == "tiny":
            from tests.tiny_model import make_tiny_llama

            model = str(make_tiny_llama(work / "tiny-llama"))
        with cluster(work / "run", n, model, cache, pod_threads) as layout:
            for rep in range(reps):
                progress(
                    f"[scaling] burst {rep + 1}/{reps}: waiting for {n} warm pods and the DRAM copy"
                )
                t = time.monotonic()
                asyncio.run(wait_pool(layout, n))
                if rep == 0:
                    pool_s = time.monotonic() - t
                runs.append(asyncio.run(burst(layout, model, n, f"burst-{rep + 1}")))
                progress(
                    f"[scaling] burst {rep + 1}: all served in {runs[-1]['all_served_s']:.2f}s"
                )
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return pool_s, runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--burst", type=int, default=64, help="instances in the burst")
    parser.add_argument("--burst-model", default="", help="model for the burst; 'tiny' for a "
                        "tiny random Llama (default: --model)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="1 rep, burst of 16")
    parser.add_argument("--skip-burst", action="store_true")
    parser.add_argument("--skip-single", action="store_true", help="the burst only")
    parser.add_argument(
        "--allow-busy", action="store_true",
        help="run even while other platform processes share this host (figures are then noisy)",
    )  # fmt: skip
    parser.add_argument(
        "--shm-dir", type=Path, default=Path("/dev/shm"),
        help="tmpfs for the DRAM copies and weights caches, e.g. one mounted with huge=always",
    )  # fmt: skip
    parser.add_argument(
        "--burst-pod-threads", type=int, default=1,
        help="CPU threads per pod in the burst (64 pods share this host's cores); 0: all cores",
    )  # fmt: skip
    parser.add_argument(
        "--single-pod-threads", type=int, default=1,
        help="CPU threads per pod in part 1; 0: all cores (a host loaded beyond its cores makes "
             "OpenMP teams wait for descheduled partners)",
    )  # fmt: skip
    parser.add_argument(
        "--hosts", type=int, default=1,
        help="N > 1: the burst (default 32) with pods spread over N network-namespace hosts, "
             "beside the same burst on one (root; bench/hosts.py)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.hosts > 1:
        from bench import hosts

        burst = 32 if "--burst" not in sys.argv else args.burst
        hosts.main(
            ["--hosts", str(args.hosts), "--burst", str(burst),
             "--burst-model", args.burst_model or "tiny",
             "--burst-pod-threads", str(args.burst_pod_threads)]
        )  # fmt: skip
        return
    if args.quick:
        args.reps, args.burst = 1, min(args.burst, 16)

    print(machine_line())
    others = platform_processes()
    if others:
        listed = "\n".join(f"  {p.pid} {p.command}" for p in others[:10])
        print(f"{len(others)} other platform processes are running:\n{listed}")
        if not args.allow_busy:
            sys.exit("refusing to measure beside them (they share the cores); stop them, or "
                     "pass --allow-busy and report the load")  # fmt: skip

    if not args.skip_single:
        single = asyncio.run(
            single_instance(
                args.model, args.reps, threads=args.single_pod_threads, shm_dir=args.shm_dir
            )
        )
        medians = single.medians()
        cold = medians["cold"]
        labels = {
            "cold": "(a) cold: new process, weights from disk",
            "disk": "(b) warm pod, weights from disk",
            "dram": "(c) warm pod, DRAM pre-loaded",
            "fork": "(d) warm pod, fork from a running instance (same host: shared memory)",
            "stream": "(d') warm pod, fork over the gRPC stream (what another host gets)",
        }
        rows = [
            [labels[k], spread(single.times[k]), cold / medians[k], single.steps[k]] for k in labels
        ]
        threads = args.single_pod_threads or "all cores"
        print(
            f"\n## Scale-up to first token, {args.model}, {threads} thread(s) per pod, "
            f"median (range) of {args.reps}\n"
        )
        print(machine_line())
        print(
            markdown_table(["path", "seconds", "speed-up vs (a)", "pod's steps (last run)"], rows)
        )
        ratios = [f / c for f, c in zip(single.fork_gbps, single.fresh_copy_gbps, strict=False)]
        print(
            f"\nfork's copy {spread(single.fork_gbps)} GB/s; plain copy of the same bytes into "
            f"fresh shared memory, same reps: {spread(single.fresh_copy_gbps)} GB/s; "
            f"fork / plain copy {spread(ratios)}"
        )

    if args.skip_burst:
        return
    burst_model = args.burst_model or args.model
    pool_s, runs = run_bursts(
        args.burst, burst_model, args.reps, shm_dir=args.shm_dir,
        pod_threads=args.burst_pod_threads,
    )  # fmt: skip
    name = "tiny random Llama" if args.burst_model == "tiny" else burst_model
    threads = args.burst_pod_threads or "all cores"
    print(
        f"\n## Burst 0 -> {args.burst} instances ({name}, pods forked from the zygote, "
        f"{threads} thread(s) per pod, {os.cpu_count()} cores), median (range) of {len(runs)}\n"
    )
    print(machine_line())

    def col(key: str) -> str:
        return spread([float(r[key]) for r in runs])

    print(markdown_table(["figure", "value"], [
        [f"{args.burst} warm pods + DRAM copy ready (s, from `up`)", pool_s],
        ["load average (1 min) at each burst's start", col("load_average_1m")],
        ["first instance served (s)", col("first_served_s")],
        ["half served (s)", col("half_served_s")],
        [f"all {args.burst} served (s)", col("all_served_s")],
        ["median weights_loaded step (s)", col("median_weights_loaded_s")],
        ["median step durations (s), last burst", runs[-1]["median_steps"]],
        ["CPU seconds, platform processes, from ScaleJob to all served", col("cpu_s")],
        ["CPU seconds by process, last burst", runs[-1]["cpu_by_process"]],
        ["weights sources, last burst", runs[-1]["weights"]],
        ["TTFT of a request at zero replicas (s)", col("ttft_at_zero_s")],
        ["autoscaler event", runs[-1]["from_zero_event"]],
    ]))  # fmt: skip


if __name__ == "__main__":
    main()
