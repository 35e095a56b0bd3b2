"""Fault injection under load: kill or restart each part of a local cluster mid-stream.

Processes: `deepserve up` (etcd, valkey-server, scheduler, jobmgr, podpool, gateway, the pods
of a serving job with `--replicas` instances, `--lease-ttl`), plus a second gateway replica
started here on the same stores. The client is this process: each case sends a wave of
`--streams` concurrent streamed completions (seeded sampling, `--tokens` tokens each,
`ignore_eos`), half through each gateway, injects the fault once every stream has its first
token, and follows every stream to its end. Cases:

    none           no fault (the baseline's own noise: seeded outputs of a second wave)
    instance       SIGKILL the pod of one of the serving instances
    jobmgr         SIGKILL jobmgr (the leader; `up` restarts it)
    scheduler      SIGKILL the scheduler (`up` restarts it)
    podpool        SIGKILL podpool (`up` restarts it; its pods live on)
    gateway        SIGKILL one of the two gateway replicas (`up`'s; it restarts it)
    etcd           SIGKILL etcd (`up` restarts it on its data dir)
    redis-restart  SIGKILL the Redis-protocol server (`up` restarts it, empty)
    redis-flush    FLUSHALL on the Redis-protocol server

Per case: streams completed, failed (an error event or a lost connection), hung (no token for
`--hang-after` seconds), with duplicated or missing tokens (fewer or more tokens than asked, or
usage disagreeing with what was streamed), and differing from the first wave's seeded output;
the time from the fault until the cluster is whole again (every service SERVING, the model's
instances all back in the scheduler's table, a warm pod); for `instance`, the time until the
replica count is back. After the etcd restart, an API key, an uploaded file and the job made
before it must still exist.

    .venv/bin/python -m bench.faults                          # every case
    .venv/bin/python -m bench.faults --cases instance,etcd --streams 20 --tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import openai
import redis.asyncio as aioredis

from bench.common import markdown_table, progress
from deepserve import records
from deepserve.cluster.layout import ClusterLayout
from deepserve.processes import ManagedProcess, bound_to_parent, free_port, wait_for_port
from deepserve.rpc.client import insecure_channel
from deepserve.rpc.health_check import check_health
from deepserve.store.etcd import EtcdStore
from deepserve.tenancy.api_keys import ApiKeys, hash_api_key
from deepserve.v1 import jobmgr_pb2, jobmgr_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

CASES = (
    "none",
    "instance",
    "jobmgr",
    "scheduler",
    "podpool",
    "gateway",
    "etcd",
    "redis-restart",
    "redis-flush",
)
# Why a failure is the right outcome where one is.
EXPECTED_FAILURES = {
    "gateway": "a client connected to the killed gateway loses its connection; the other "
    "replica's clients are unaffected (a load balancer would send new requests there)",
}
PROMPTS = [
    "Once upon a time in a small village",
    "The history of the printing press",
    "A recipe for a simple tomato soup",
    "Why the sky is blue, explained",
    "The rules of chess in short",
]


@dataclass
class StreamResult:
    """One streamed completion as the client saw it."""

    index: int
    gateway: int
    status: str = "pending"  # completed, failed, hung
    text: str = ""
    tokens: int = 0
    usage_tokens: int = -1
    error: str = ""
    first_token_at: float | None = None


@dataclass
class CaseResult:
    """One row of the table."""

    case: str
    streams: int
    completed: int = 0
    failed: int = 0
    hung: int = 0
    bad_tokens: int = 0
    differs: int = 0
    recovery_s: float | None = None
    replicas_back_s: float | None = None
    after_ok: int = 0
    after_total: int = 0
    migrations: float = 0.0
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class FaultCluster:
    """`deepserve up` plus a second gateway replica, bound to this process."""

    def __init__(self, run_dir: Path, model: str, replicas: int, lease_ttl_s: int) -> None:
        self.run_dir = run_dir
        self.model = model
        self.replicas = replicas
        self.lease_ttl_s = lease_ttl_s
        self.up: subprocess.Popen[bytes] | None = None
        self.gateway2: ManagedProcess | None = None
        self.layout: ClusterLayout | None = None
        self.gateway2_http = 0
        self.gateway2_grpc = 0

    def start(self, timeout_s: float = 300.0) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable, "-m", "deepserve.cli.main", "up", "--free-ports",
            "--run-dir", str(self.run_dir), "--model", self.model,
            "--replicas", str(self.replicas), "--lease-ttl", str(self.lease_ttl_s),
        ]  # fmt: skip
        out = (self.run_dir / "up.out").open("wb")
        self.up = subprocess.Popen(bound_to_parent(argv), stdout=out, stderr=subprocess.STDOUT)
        state = self.run_dir / "cluster.json"
        deadline = time.monotonic() + timeout_s
        while not state.exists():
            if self.up.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((self.run_dir / "up.out").read_text())
            time.sleep(0.2)
        self.layout = ClusterLayout.load(self.run_dir)
        lay = self.layout
        self.gateway2_http, self.gateway2_grpc = free_port(), free_port()
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "DEEPSERVE_ETCD_ENDPOINT": lay.etcd_endpoint,
            "DEEPSERVE_REDIS_URL": lay.redis_url,
            "DEEPSERVE_HOST": lay.host,
            "DEEPSERVE_LEASE_TTL_S": str(self.lease_ttl_s),
            "DEEPSERVE_TELEMETRY_DIR": str(lay.telemetry_dir),
            "DEEPSERVE_GATEWAY_GRPC_PORT": str(self.gateway2_grpc),
            "DEEPSERVE_GATEWAY_HTTP_PORT": str(self.gateway2_http),
            "DEEPSERVE_GATEWAY_SCHEDULER_ADDRESS": lay.address("scheduler"),
            "DEEPSERVE_GATEWAY_JOBMGR_ADDRESS": lay.address("jobmgr"),
            "DEEPSERVE_GATEWAY_AUTH_OPEN": "true",
        }
        self.gateway2 = ManagedProcess(
            "gateway-2",
            [sys.executable, "-m", "deepserve.gateway"],
            lay.log_dir / "gateway-2.log",
            env=env,
        ).start()
        if not wait_for_port(lay.host, self.gateway2_http, 60):
            raise RuntimeError(self.gateway2.tail())

    @property
    def lay(self) -> ClusterLayout:
        assert self.layout is not None
        return self.layout

    @property
    def gateway_urls(self) -> list[str]:
        return [self.lay.gateway_url, f"http://{self.lay.host}:{self.gateway2_http}"]

    def pid(self, name: str) -> int:
        return int(json.loads(self.lay.state_file.read_text())["pids"][name])

    def stop(self) -> None:
        if self.gateway2 is not None:
            self.gateway2.stop()
        if self.up is not None and self.up.poll() is None:
            self.up.send_signal(signal.SIGTERM)
            try:
                self.up.wait(90)
            except subprocess.TimeoutExpired:
                self.up.kill()

    # --- state ------------------------------------------------------------------------------

    async def instances(self) -> list[records.InstanceRecord]:
        async with EtcdStore(self.lay.etcd_endpoint, timeout_s=2) as etcd:
            found, _ = await records.instances(etcd).list()
        return [v.record for v in found if v.record.model == self.model]

    async def pods(self) -> dict[str, records.PodRecord]:
        async with EtcdStore(self.lay.etcd_endpoint, timeout_s=2) as etcd:
            found, _ = await records.pods(etcd).list()
        return {v.record.pod_id: v.record for v in found}

    async def scheduler_instances(self) -> set[str]:
        async with insecure_channel(self.lay.address("scheduler"), traced=False) as channel:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            reply = await stub.ListInstances(
                scheduler_pb2.ListInstancesRequest(model=self.model), timeout=2
            )
        return {i.instance_id for i in reply.instances}

    async def whole(self, gone: set[str]) -> bool:
        """Every service SERVING, all replicas (none of `gone`) routable, a warm pod."""
        addresses = [self.lay.address(s) for s in ("scheduler", "jobmgr", "podpool", "gateway")]
        addresses.append(f"{self.lay.host}:{self.gateway2_grpc}")
        health = await asyncio.gather(*(check_health(a, timeout_s=1.0) for a in addresses))
        if any(h != "SERVING" for h in health):
            return False
        try:
            routable = await self.scheduler_instances()
            pods = await self.pods()
        except Exception:
            return False
        if len(routable - gone) < self.replicas or routable & gone:
            return False
        return any(p.state == records.PodState.WARM for p in pods.values())

    async def migrations(self) -> dict[str, float]:
        """Each gateway process's migrated-request count (Prometheus text), by process."""
        counts: dict[str, float] = {}
        async with EtcdStore(self.lay.etcd_endpoint, timeout_s=2) as etcd:
            found, _ = await records.services(etcd, "gateway").list()
        async with httpx.AsyncClient(timeout=5) as http:
            for service in found:
                address = service.record.metrics_address
                if not address:
                    continue
                try:
                    text = (await http.get(f"http://{address}/metrics")).text
                except httpx.HTTPError:
                    continue
                counts[service.key] = sum(
                    float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines()
                    if line.startswith("deepserve_request_migrations_total{")
                    and 'outcome="migrated"' in line
                )
        return counts


def migrated_between(before: dict[str, float], after: dict[str, float]) -> float:
    """Migrations counted between two readings; a restarted gateway's counts start at 0."""
    return sum(value - before.get(process, 0.0) for process, value in after.items())


# --- load ---------------------------------------------------------------------------------


async def run_stream(
    client: openai.AsyncOpenAI,
    result: StreamResult,
    model: str,
    tokens: int,
    hang_after_s: float,
    started: asyncio.Event,
) -> None:
    prompt = f"{PROMPTS[result.index % len(PROMPTS)]} (story {result.index}):"
    try:
        stream = await client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=tokens,
            temperature=0.8,
            seed=1000 + result.index,
            stream=True,
            logprobs=0,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        iterator = stream.__aiter__()
        while True:
            try:
                chunk = await asyncio.wait_for(iterator.__anext__(), hang_after_s)
            except StopAsyncIteration:
                break
            if chunk.usage is not None:
                result.usage_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                result.text += choice.text
                if choice.logprobs is not None and choice.logprobs.tokens:
                    result.tokens += len(choice.logprobs.tokens)
                    if result.first_token_at is None:
                        result.first_token_at = time.monotonic()
                        started.set()
        result.status = "completed"
    except TimeoutError:
        result.status = "hung"
        result.error = f"no token for {hang_after_s:.0f}s"
    except Exception as exc:
        result.status = "failed"
        result.error = f"{type(exc).__name__}: {exc}"[:200]


async def wave(
    cluster: FaultCluster,
    streams: int,
    tokens: int,
    hang_after_s: float,
    fault: Callable[[], Awaitable[None]] | None,
) -> tuple[list[StreamResult], float | None]:
    """Runs the streams; fires `fault` once every stream has its first token (or 60 s)."""
    clients = [
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)
        for url in cluster.gateway_urls
    ]
    results = [StreamResult(i, i % len(clients)) for i in range(streams)]
    events = [asyncio.Event() for _ in results]
    tasks = [
        asyncio.create_task(
            run_stream(clients[r.gateway], r, cluster.model, tokens, hang_after_s, e)
        )
        for r, e in zip(results, events, strict=True)
    ]
    fault_at: float | None = None
    if fault is not None:
        with_deadline = asyncio.gather(*(e.wait() for e in events))
        try:
            await asyncio.wait_for(with_deadline, 60)
        except TimeoutError:
            progress("not every stream started within 60 s; injecting anyway")
        await asyncio.sleep(0.5)  # a few tokens in: the fault lands mid-stream
        fault_at = time.monotonic()
        await fault()
    await asyncio.gather(*tasks)
    for client in clients:
        await client.close()
    return results, fault_at


# --- faults -------------------------------------------------------------------------------


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


class Faults:
    """The fault of each case, and what it needs to know afterwards."""

    def __init__(self, cluster: FaultCluster) -> None:
        self.cluster = cluster
        self.gone: set[str] = set()

    async def inject(self, case: str) -> None:
        c = self.cluster
        self.gone = set()
        if case == "instance":
            instances = await c.instances()
            pods = await c.pods()
            victim = instances[0]
            self.gone = {victim.instance_id}
            kill(pods[victim.pod_id].pid)
        elif case in ("jobmgr", "scheduler", "podpool", "gateway", "etcd"):
            kill(c.pid(case))
        elif case == "redis-restart":
            kill(c.pid("redis"))
        elif case == "redis-flush":
            client = aioredis.from_url(c.lay.redis_url)
            try:
                await client.flushall()
            finally:
                await client.aclose()
        elif case != "none":
            raise ValueError(f"unknown case {case!r}")


@dataclass
class Durables:
    """Records made before the etcd restart, checked after it."""

    key_hash: str
    file_id: str
    job_id: str


async def make_durables(cluster: FaultCluster) -> Durables:
    async with EtcdStore(cluster.lay.etcd_endpoint) as etcd:
        key, _ = await ApiKeys(etcd).create(f"faults-{uuid.uuid4().hex[:6]}")
    async with httpx.AsyncClient(base_url=cluster.lay.gateway_url, timeout=30) as http:
        line = {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
            ]
        }
        reply = await http.post(
            "/v1/files",
            files={"file": ("train.jsonl", (json.dumps(line) + "\n").encode())},
            data={"purpose": "fine-tune"},
        )
        reply.raise_for_status()
    async with insecure_channel(cluster.lay.address("jobmgr"), traced=False) as channel:
        stub = jobmgr_pb2_grpc.JobManagerServiceStub(channel)
        jobs = await stub.ListJobs(jobmgr_pb2.ListJobsRequest(), timeout=10)
    return Durables(hash_api_key(key), reply.json()["id"], jobs.jobs[0].job_id)


async def check_durables(cluster: FaultCluster, made: Durables) -> list[str]:
    lost = []
    async with EtcdStore(cluster.lay.etcd_endpoint) as etcd:
        if await etcd.get(f"/deepserve/apikeys/{made.key_hash}") is None:
            lost.append("API key")
    async with httpx.AsyncClient(base_url=cluster.lay.gateway_url, timeout=30) as http:
        if (await http.get(f"/v1/files/{made.file_id}")).status_code != 200:
            lost.append("file")
    async with insecure_channel(cluster.lay.address("jobmgr"), traced=False) as channel:
        stub = jobmgr_pb2_grpc.JobManagerServiceStub(channel)
        try:
            await stub.GetJob(jobmgr_pb2.GetJobRequest(job_id=made.job_id), timeout=10)
        except Exception:
            lost.append("job")
    return lost


# --- one case -----------------------------------------------------------------------------


async def wait_whole(
    cluster: FaultCluster, gone: set[str], since: float, limit_s: float
) -> float | None:
    while time.monotonic() - since < limit_s:
        if await cluster.whole(gone):
            return time.monotonic() - since
        await asyncio.sleep(0.1)
    return None


async def watch_replicas(cluster: FaultCluster, gone: set[str], since: float) -> float | None:
    """Seconds until the model has all its replicas again, none of them `gone`."""
    while time.monotonic() - since < 120:
        try:
            current = {i.instance_id for i in await cluster.instances()}
        except Exception:
            current = set()
        if len(current - gone) >= cluster.replicas:
            return time.monotonic() - since
        await asyncio.sleep(0.05)
    return None


async def after_requests(cluster: FaultCluster, count: int = 4) -> tuple[int, list[str]]:
    """New requests right after the case, through both gateways."""
    ok, errors = 0, []
    for i in range(count):
        url = cluster.gateway_urls[i % 2]
        async with openai.AsyncOpenAI(
            base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=120
        ) as client:
            try:
                await client.completions.create(
                    model=cluster.model, prompt=f"after {i}", max_tokens=4
                )
                ok += 1
            except Exception as exc:
                errors.append(f"after-request via gateway {i % 2 + 1}: {exc}"[:200])
    return ok, errors


async def run_case(
    cluster: FaultCluster,
    case: str,
    args: argparse.Namespace,
    reference: dict[int, str],
) -> CaseResult:
    faults = Faults(cluster)
    durables = await make_durables(cluster) if case == "etcd" else None
    migrations_before = await cluster.migrations()
    replicas_task: asyncio.Task[float | None] | None = None
    recovery_task: asyncio.Task[float | None] | None = None

    async def fault() -> None:
        nonlocal replicas_task, recovery_task
        await faults.inject(case)
        since = time.monotonic()
        progress(f"{case}: fault injected")
        if case == "instance":
            replicas_task = asyncio.create_task(watch_replicas(cluster, faults.gone, since))
        recovery_task = asyncio.create_task(wait_whole(cluster, faults.gone, since, 180))

    results, _ = await wave(
        cluster, args.streams, args.tokens, args.hang_after, None if case == "none" else fault
    )
    row = CaseResult(case=case, streams=len(results))
    for r in results:
        setattr(row, r.status, getattr(row, r.status) + 1)
        if r.status == "completed":
            if r.tokens != args.tokens or r.usage_tokens != args.tokens:
                row.bad_tokens += 1
            if reference and r.text != reference.get(r.index):
                row.differs += 1
        elif r.error and len(row.errors) < 3:
            row.errors.append(f"stream {r.index} (gateway {r.gateway + 1}): {r.error}")
    if recovery_task is not None:
        row.recovery_s = await recovery_task
    if replicas_task is not None:
        row.replicas_back_s = await replicas_task
    row.migrations = migrated_between(migrations_before, await cluster.migrations())
    if durables is not None:
        lost = await check_durables(cluster, durables)
        row.notes.append(
            "lost after restart: " + ", ".join(lost) if lost else "no job, file or API key lost"
        )
    row.after_ok, errors = await after_requests(cluster)
    row.after_total = 4
    row.errors.extend(errors)
    if case in EXPECTED_FAILURES and row.failed:
        row.notes.append(EXPECTED_FAILURES[case])
    return row


def table(rows: Sequence[CaseResult], lease_ttl_s: int) -> str:
    headers = [
        "fault", "completed", "failed", "hung", "dup/missing tokens", "differs from no-fault run",
        "migrated", "new requests after", "full recovery (s)", "replicas back (s)",
    ]  # fmt: skip
    body = []
    for r in rows:
        body.append(
            [
                r.case,
                f"{r.completed}/{r.streams}",
                r.failed,
                r.hung,
                r.bad_tokens,
                r.differs,
                int(r.migrations),
                f"{r.after_ok}/{r.after_total}",
                "-" if r.recovery_s is None else f"{r.recovery_s:.1f}",
                "-"
                if r.replicas_back_s is None
                else f"{r.replicas_back_s:.1f} (TTL {lease_ttl_s})",
            ]
        )
    return markdown_table(headers, body)


async def main_async(args: argparse.Namespace) -> int:
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - set(CASES)
    if unknown:
        raise SystemExit(f"unknown cases: {', '.join(sorted(unknown))}")
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="deepserve-faults-"))
    cluster = FaultCluster(run_dir, args.model, args.replicas, args.lease_ttl)
    progress(f"starting the cluster in {run_dir}")
    cluster.start()  # on this thread: the cluster is bound to it (its parent-death signal)
    rows: list[CaseResult] = []
    try:
        progress(f"reference wave: {args.streams} streams x {args.tokens} tokens, no fault")
        first, _ = await wave(cluster, args.streams, args.tokens, args.hang_after, None)
        reference = {r.index: r.text for r in first if r.status == "completed"}
        progress(f"reference: {len(reference)}/{len(first)} completed")
        for case in cases:
            if await wait_whole(cluster, set(), time.monotonic(), 180) is None:
                progress(f"cluster not whole before {case}; running anyway")
            progress(f"case {case}")
            row = await run_case(cluster, case, args, reference)
            rows.append(row)
            progress(
                f"{case}: completed {row.completed} failed {row.failed} hung {row.hung} "
                f"recovery {row.recovery_s} replicas {row.replicas_back_s} {row.notes} {row.errors}"
            )
    finally:
        await asyncio.to_thread(cluster.stop)
    print(table(rows, args.lease_ttl))
    for r in rows:
        for note in r.notes:
            print(f"- {r.case}: {note}")
        for error in r.errors:
            print(f"- {r.case}: {error}")
    if args.json:
        body = json.dumps([asdict(r) for r in rows], indent=2)
        await asyncio.to_thread(Path(args.json).write_text, body)
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}; "
        f"load: {args.streams} streams x {args.tokens} tokens, {args.replicas} replicas of "
        f"{args.model}, lease TTL {args.lease_ttl}s"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--lease-ttl", type=int, default=5)
    parser.add_argument("--hang-after", type=float, default=60.0)
    parser.add_argument("--run-dir", default="")
    parser.add_argument("--json", default="", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
