"""`deepserve up`: etcd, a Redis-protocol server and the services as supervised processes.

Starts the stores, then scheduler, jobmgr, podpool and gateway with their ports and endpoints in
`DEEPSERVE_*` variables; podpool starts the flowserve pods (pre-warmed: runtime up, no model).
Waits until every service's gRPC health says SERVING and a warm pod has registered. With a
model, deploys it the way a user would — a serving job through jobmgr, whose reconcile loop
gets a pod from the pool and loads the model — and waits for the instance. Then supervises: a
service that exits is restarted and restores its view from etcd. Ctrl-C or SIGTERM stops
everything (services, their pods, then the stores), leaving no process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from deepserve import records
from deepserve.cluster.layout import LAUNCHED_SERVICES, ClusterLayout
from deepserve.cluster.state_stores import start_etcd, start_redis_server
from deepserve.errors import FailedPrecondition, Unavailable
from deepserve.processes import ManagedProcess, is_loopback, wait_for_port
from deepserve.rpc.client import insecure_channel
from deepserve.rpc.errors import error_from_rpc
from deepserve.rpc.health_check import check_health, wait_serving
from deepserve.store.etcd import EtcdStore
from deepserve.v1 import jobmgr_pb2, jobmgr_pb2_grpc

log = logging.getLogger(__name__)


@dataclass
class LaunchOptions:
    layout: ClusterLayout
    # Catalog name or directory deployed as a serving job; "" serves nothing (warm pods only).
    model: str = ""
    replicas: int = 1
    # Pre-warmed pods podpool keeps beyond those serving models.
    warm_pods: int = 1
    # "process": each pod a fresh interpreter; "zygote": forked from one that imported the runtime.
    pod_start: str = "process"
    lease_ttl_s: int = 5
    startup_timeout_s: float = 60.0
    model_timeout_s: float = 300.0
    # Open mode (no API key needed): None takes DEEPSERVE_GATEWAY_AUTH_OPEN from the
    # environment, open when it is unset (the local demo); False requires keys.
    auth_open: bool | None = None
    # Lets an open gateway listen on a non-loopback host (otherwise `up` refuses to start).
    allow_open_remote: bool = False
    restart_crashed: bool = True
    # Added to the niceness of etcd, the Redis-protocol server, scheduler, jobmgr and gateway
    # (not podpool, whose pods inherit its priority): on a host where the engines share cores
    # with the control plane, the engines' forward threads then keep their cores when both
    # want them.
    control_plane_nice: int = 0

    @property
    def gateway_open(self) -> bool:
        if self.auth_open is not None:
            return self.auth_open
        value = os.environ.get("DEEPSERVE_GATEWAY_AUTH_OPEN", "").strip().lower()
        return value not in ("0", "false", "no", "off")


def job_id_for(model: str) -> str:
    """A stable job id per model, so `up` after a restart finds its deployment again."""
    slug = re.sub(r"[^a-z0-9]+", "-", os.path.basename(model.rstrip("/")).lower()).strip("-")
    return f"serve-{slug or 'model'}"


class LocalCluster:
    """Owns the child processes of one local cluster."""

    def __init__(self, options: LaunchOptions, say: Callable[[str], None] = print) -> None:
        self.options = options
        self.layout = options.layout
        self.say = say
        self.stores: list[ManagedProcess] = []
        self.services: dict[str, ManagedProcess] = {}
        self._restarts: dict[str, int] = {}
        self._stopping = False

    # --- environment -----------------------------------------------------------------------

    def service_env(self) -> dict[str, str]:
        lay = self.layout
        ports = lay.ports
        return {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "DEEPSERVE_ETCD_ENDPOINT": lay.etcd_endpoint,
            "DEEPSERVE_REDIS_URL": lay.redis_url,
            "DEEPSERVE_HOST": lay.host,
            "DEEPSERVE_LEASE_TTL_S": str(self.options.lease_ttl_s),
            "DEEPSERVE_TELEMETRY_DIR": str(lay.telemetry_dir),
            "DEEPSERVE_GATEWAY_GRPC_PORT": str(ports.gateway),
            "DEEPSERVE_GATEWAY_HTTP_PORT": str(ports.gateway_http),
            "DEEPSERVE_GATEWAY_SCHEDULER_ADDRESS": lay.address("scheduler"),
            "DEEPSERVE_GATEWAY_JOBMGR_ADDRESS": lay.address("jobmgr"),
            "DEEPSERVE_GATEWAY_AUTH_OPEN": "true" if self.options.gateway_open else "false",
            "DEEPSERVE_GATEWAY_AUTH_OPEN_ALLOW_REMOTE": (
                "true" if self.options.allow_open_remote else "false"
            ),
            "DEEPSERVE_JOBMGR_GRPC_PORT": str(ports.jobmgr),
            "DEEPSERVE_JOBMGR_PODPOOL_ADDRESS": lay.address("podpool"),
            "DEEPSERVE_SCHEDULER_GRPC_PORT": str(ports.scheduler),
            "DEEPSERVE_PODPOOL_GRPC_PORT": str(ports.podpool),
            "DEEPSERVE_PODPOOL_WARM_PODS": str(self.options.warm_pods),
            "DEEPSERVE_PODPOOL_POD_START": self.options.pod_start,
            "DEEPSERVE_PODPOOL_POD_LOG_DIR": str(lay.pod_log_dir),
        }

    # --- start -----------------------------------------------------------------------------

    def start_store(self, name: str) -> ManagedProcess:
        """Starts etcd (on its data dir, so a restart keeps every record) or the Redis-protocol
        server (empty: it holds only hot state) and waits for its port."""
        lay = self.layout
        nice = self.options.control_plane_nice
        if name == "etcd":
            proc = start_etcd(
                lay.etcd_data_dir,
                lay.host,
                lay.ports.etcd,
                lay.ports.etcd_peer,
                lay.log_dir / "etcd.log",
                nice=nice,
            )
            port = lay.ports.etcd
        else:
            proc = start_redis_server(
                lay.run_dir / "redis",
                lay.host,
                lay.ports.redis,
                lay.log_dir / "redis.log",
                nice=nice,
            )
            port = lay.ports.redis
        if not wait_for_port(lay.host, port, 30) or not proc.alive():
            raise Unavailable(f"{proc.name} did not start:\n{proc.tail()}")
        self.say(f"[up] {proc.name} listening on {lay.host}:{port} (pid {proc.pid})")
        return proc

    def start_stores(self) -> None:
        self.layout.run_dir.mkdir(parents=True, exist_ok=True)
        self.say(f"[up] run directory {self.layout.run_dir}")
        self.stores = [self.start_store("etcd"), self.start_store("redis")]

    def start_service(self, service: str) -> ManagedProcess:
        proc = ManagedProcess(
            service,
            [sys.executable, "-m", f"deepserve.{service}"],
            self.layout.log_dir / f"{service}.log",
            env=self.service_env(),
            nice=0 if service == "podpool" else self.options.control_plane_nice,
        ).start()
        self.services[service] = proc
        return proc

    def check_auth(self) -> None:
        """An open gateway (no keys) only on a loopback address, unless allowed explicitly."""
        if (
            self.options.gateway_open
            and not self.options.allow_open_remote
            and not is_loopback(self.layout.host)
        ):
            raise FailedPrecondition(
                f"the gateway would run in open mode (no API key needed) on {self.layout.host}, "
                "where others can reach it; add --require-keys (then create keys with "
                "`deepserve keys create --tenant NAME`), or --allow-open-remote to accept that"
            )

    async def start(self) -> None:
        self.check_auth()
        self.start_stores()
        for service in LAUNCHED_SERVICES:
            self.start_service(service)
        await self.wait_healthy()
        await self.wait_warm_pod()
        if self.options.model:
            await self.deploy(self.options.model)
            await self.wait_model(self.options.model)
        self.layout.save(self.pids())

    async def wait_healthy(self) -> None:
        started = time.monotonic()
        checks = {
            name: asyncio.create_task(
                wait_serving(self.layout.address(name), self.options.startup_timeout_s)
            )
            for name in LAUNCHED_SERVICES
        }
        while checks:
            done, _ = await asyncio.wait(
                checks.values(), timeout=0.2, return_when=asyncio.FIRST_COMPLETED
            )
            for name, task in list(checks.items()):
                proc = self.services[name]
                if task in done:
                    del checks[name]
                    if not task.result():
                        raise Unavailable(f"{name} did not become healthy:\n{proc.tail()}")
                    self.say(
                        f"[up] {name:<9} SERVING on {self.layout.address(name)} "
                        f"({time.monotonic() - started:.1f}s)"
                    )
                elif not proc.alive():
                    for other in checks.values():
                        other.cancel()
                    raise Unavailable(f"{name} exited during start-up:\n{proc.tail()}")

    async def wait_warm_pod(self) -> None:
        """flowserve is up once podpool's first pod serves (skipped when no pods are kept)."""
        if self.options.warm_pods <= 0:
            return
        started = time.monotonic()
        async with EtcdStore(self.layout.etcd_endpoint) as etcd:
            while time.monotonic() - started < self.options.startup_timeout_s:
                pods, _ = await records.pods(etcd).list()
                for pod in pods:
                    if await check_health(pod.record.address) == "SERVING":
                        self.say(
                            f"[up] flowserve SERVING on {pod.record.address} "
                            f"(pod {pod.record.pod_id}, {time.monotonic() - started:.1f}s)"
                        )
                        return
                self._check_alive("podpool")
                await asyncio.sleep(0.2)
        raise Unavailable(f"no flowserve pod came up; see {self.layout.pod_log_dir}")

    async def deploy(self, model: str) -> None:
        job_id = job_id_for(model)
        spec = jobmgr_pb2.JobSpec(
            kind=jobmgr_pb2.JOB_KIND_SERVING,
            serving=jobmgr_pb2.ServingSpec(
                model=model, replicas=self.options.replicas, max_replicas=self.options.replicas
            ),
        )
        async with insecure_channel(self.layout.address("jobmgr"), traced=False) as channel:
            stub = jobmgr_pb2_grpc.JobManagerServiceStub(channel)
            try:
                await stub.CreateJob(
                    jobmgr_pb2.CreateJobRequest(spec=spec, job_id=job_id), timeout=10
                )
                self.say(f"[up] deployed {model} as job {job_id}")
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise error_from_rpc(exc) from None
                self.say(f"[up] job {job_id} for {model} exists (kept from the last run)")

    async def wait_model(self, model: str) -> None:
        self.say(f"[up] loading model {model} ...")
        started = time.monotonic()
        async with EtcdStore(self.layout.etcd_endpoint) as etcd:
            instances = records.instances(etcd)
            while time.monotonic() - started < self.options.model_timeout_s:
                found, _ = await instances.list()
                if any(v.record.model == model for v in found):
                    self.say(f"[up] model {model} serving ({time.monotonic() - started:.1f}s)")
                    return
                self._check_alive("jobmgr", "podpool")
                await asyncio.sleep(0.25)
        raise Unavailable(
            f"model {model} did not come up in {self.options.model_timeout_s:.0f}s; "
            f"see `deepserve job {job_id_for(model)}` and {self.layout.pod_log_dir}"
        )

    def _check_alive(self, *names: str) -> None:
        for name in names:
            proc = self.services[name]
            if not proc.alive():
                raise FailedPrecondition(f"{name} exited:\n{proc.tail()}")

    def pids(self) -> dict[str, int]:
        procs = [*self.stores, *self.services.values()]
        return {p.name: p.pid for p in procs if p.alive()}

    # --- supervise and stop -----------------------------------------------------------------

    async def supervise(self, stop: asyncio.Event) -> None:
        """Restarts services that exit (with backoff) until `stop` is set."""
        next_start: dict[str, float] = {}
        while not stop.is_set():
            for name, proc in list(self.services.items()):
                if proc.alive():
                    continue
                now = time.monotonic()
                if name not in next_start:
                    delay = min(2.0 ** self._restarts.get(name, 0), 10.0)
                    next_start[name] = now + delay
                    code = proc.popen.returncode if proc.popen else "?"
                    self.say(f"[up] {name} exited (code {code}); restarting in {delay:.0f}s")
                elif now >= next_start[name] and self.options.restart_crashed:
                    del next_start[name]
                    self._restarts[name] = self._restarts.get(name, 0) + 1
                    self.start_service(name)
                    self.layout.save(self.pids())
            for index, proc in enumerate(self.stores):
                if proc.alive():
                    continue
                if not self.options.restart_crashed:
                    self.say(f"[up] {proc.name} exited; stopping the cluster:\n{proc.tail()}")
                    stop.set()
                    continue
                # Services ride it out (they reconnect); etcd comes back with its data.
                code = proc.popen.returncode if proc.popen else "?"
                self.say(f"[up] {proc.name} exited (code {code}); restarting it")
                try:
                    # On this (the main) thread, though it blocks for a moment: the store is
                    # bound to the thread that starts it (its parent-death signal).
                    self.stores[index] = self.start_store(proc.name)
                except Unavailable as exc:
                    self.say(f"[up] {proc.name} did not come back; stopping the cluster: {exc}")
                    stop.set()
                    continue
                self.layout.save(self.pids())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    async def stop_pods(self) -> None:
        """Ends pods still registered on this host (a podpool that was killed leaves its pods)."""
        host = socket.gethostname()
        try:
            async with EtcdStore(self.layout.etcd_endpoint, timeout_s=2) as etcd:
                await etcd.connect(wait_s=2)
                pods, _ = await records.pods(etcd).list()
        except Exception:
            return
        for pod in pods:
            if pod.record.host == host and pod.record.pid > 0:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pod.record.pid, signal.SIGTERM)
        for _ in range(100):  # up to 10 s for a graceful exit
            if not any(_alive(pod.record.pid) for pod in pods):
                break
            await asyncio.sleep(0.1)
        for pod in pods:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pod.record.pid, signal.SIGKILL)

    def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        for name in reversed(LAUNCHED_SERVICES):
            proc = self.services.get(name)
            if proc is not None:
                proc.stop(timeout_s=15)
        if self.stores and self.stores[0].alive():
            asyncio.run(self.stop_pods())
        for proc in reversed(self.stores):
            proc.stop(timeout_s=10)
        self.layout.state_file.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def run_cluster(options: LaunchOptions, say: Callable[[str], None] = print) -> int:
    cluster = LocalCluster(options, say)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        start = asyncio.create_task(cluster.start())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({start, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not start.done():
            start.cancel()
            say("[up] interrupted during start-up")
            return 130
        stopper.cancel()
        start.result()
        lay = options.layout
        say("")
        say(f"DeepServe is up. Gateway: {lay.gateway_url} (gRPC {lay.address('gateway')})")
        say(f"  logs and state: {lay.run_dir}")
        say(f"  try:  curl -s {lay.gateway_url}/v1/models")
        if options.model:
            say(
                f"        curl -s {lay.gateway_url}/v1/chat/completions -H 'Content-Type: "
                f'application/json\' -d \'{{"model": "{options.model}", "messages": '
                '[{"role": "user", "content": "What is the capital of France?"}]}\''
            )
        if options.gateway_open:
            say("  auth: open mode, no API key needed (up --require-keys to require them)")
        else:
            say("  auth: API keys required; create one: deepserve keys create --tenant NAME")
        say("  status: deepserve status    stop: Ctrl-C")
        await cluster.supervise(stop)
        return 0
    except Exception as exc:
        say(f"[up] failed: {exc}")
        return 1
    finally:
        say("[up] stopping ...")
        await asyncio.get_running_loop().run_in_executor(None, cluster.stop)
        say("[up] stopped")
