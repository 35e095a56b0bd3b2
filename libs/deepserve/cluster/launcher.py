"""`deepserve up`: etcd, a Redis-protocol server and the five services as supervised processes.

Starts the stores, then each service with its ports and endpoints in `DEEPSERVE_*` variables,
waits until every service's gRPC health says SERVING (and, when a model is asked for, until an
instance of it registers), prints where the gateway listens, then supervises: a service that
exits is restarted (it restores its view from etcd). Ctrl-C or SIGTERM stops everything,
services first, then the stores, leaving no process behind.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from deepserve import records
from deepserve.cluster.health import wait_serving
from deepserve.cluster.layout import SERVICES, ClusterLayout
from deepserve.cluster.processes import (
    ManagedProcess,
    start_etcd,
    start_redis_server,
    wait_for_port,
)
from deepserve.errors import FailedPrecondition, Unavailable
from deepserve.store.etcd import EtcdStore

log = logging.getLogger(__name__)


@dataclass
class LaunchOptions:
    layout: ClusterLayout
    # Catalog name or directory served by the first flowserve pod; "" starts it warm (no model).
    model: str = ""
    lease_ttl_s: int = 5
    startup_timeout_s: float = 60.0
    model_timeout_s: float = 300.0
    auth_open: bool = True
    restart_crashed: bool = True


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

    def service_env(self, service: str) -> dict[str, str]:
        lay = self.layout
        ports = lay.ports
        env = {
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
            "DEEPSERVE_GATEWAY_AUTH_OPEN": "true" if self.options.auth_open else "false",
            "DEEPSERVE_JOBMGR_GRPC_PORT": str(ports.jobmgr),
            "DEEPSERVE_JOBMGR_PODPOOL_ADDRESS": lay.address("podpool"),
            "DEEPSERVE_SCHEDULER_GRPC_PORT": str(ports.scheduler),
            "DEEPSERVE_PODPOOL_GRPC_PORT": str(ports.podpool),
            "DEEPSERVE_FLOWSERVE_GRPC_PORT": str(ports.flowserve),
        }
        if service == "flowserve":
            env["DEEPSERVE_FLOWSERVE_MODEL"] = self.options.model
        return env

    # --- start -----------------------------------------------------------------------------

    def start_stores(self) -> None:
        lay = self.layout
        lay.run_dir.mkdir(parents=True, exist_ok=True)
        self.say(f"[up] run directory {lay.run_dir}")
        etcd = start_etcd(
            lay.etcd_data_dir,
            lay.host,
            lay.ports.etcd,
            lay.ports.etcd_peer,
            lay.log_dir / "etcd.log",
        )
        self.stores.append(etcd)
        redis = start_redis_server(
            lay.run_dir / "redis", lay.host, lay.ports.redis, lay.log_dir / "redis.log"
        )
        self.stores.append(redis)
        for proc, port in ((etcd, lay.ports.etcd), (redis, lay.ports.redis)):
            if not wait_for_port(lay.host, port, 30) or not proc.alive():
                raise Unavailable(f"{proc.name} did not start:\n{proc.tail()}")
            self.say(f"[up] {proc.name} listening on {lay.host}:{port} (pid {proc.pid})")

    def start_service(self, service: str) -> ManagedProcess:
        proc = ManagedProcess(
            service,
            [sys.executable, "-m", f"deepserve.{service}"],
            self.layout.log_dir / f"{service}.log",
            env=self.service_env(service),
        ).start()
        self.services[service] = proc
        return proc

    async def start(self) -> None:
        self.start_stores()
        for service in SERVICES:
            self.start_service(service)
        await self.wait_healthy()
        if self.options.model:
            await self.wait_model(self.options.model)
        self.layout.save(self.pids())

    async def wait_healthy(self) -> None:
        started = time.monotonic()
        checks = {
            name: asyncio.create_task(
                wait_serving(self.layout.address(name), self.options.startup_timeout_s)
            )
            for name in SERVICES
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
                if not self.services["flowserve"].alive():
                    raise FailedPrecondition(
                        f"flowserve exited while loading {model}:\n{self.services['flowserve'].tail()}"
                    )
                await asyncio.sleep(0.25)
        raise Unavailable(f"model {model} did not come up in {self.options.model_timeout_s:.0f}s")

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
                    count = self._restarts.get(name, 0)
                    delay = min(2.0**count, 10.0)
                    next_start[name] = now + delay
                    self.say(
                        f"[up] {name} exited (code {proc.popen.returncode if proc.popen else '?'});"
                        f" restarting in {delay:.0f}s"
                    )
                elif now >= next_start[name] and self.options.restart_crashed:
                    del next_start[name]
                    self._restarts[name] = self._restarts.get(name, 0) + 1
                    self.start_service(name)
                    self.layout.save(self.pids())
            for proc in self.stores:
                if not proc.alive():
                    self.say(f"[up] {proc.name} exited; stopping the cluster:\n{proc.tail()}")
                    stop.set()
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except TimeoutError:
                pass

    def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        for name in reversed(SERVICES):
            proc = self.services.get(name)
            if proc is not None:
                proc.stop(timeout_s=15)
        for proc in reversed(self.stores):
            proc.stop(timeout_s=10)
        self.layout.state_file.unlink(missing_ok=True)


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
