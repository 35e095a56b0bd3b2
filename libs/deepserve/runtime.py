"""What every service process does around its own logic.

Telemetry and JSON logs, the etcd (and optionally Redis) connection, the gRPC server with health
and reflection, registration under a lease, and an orderly shutdown on SIGTERM/SIGINT: stop
taking calls, drain, run the service's hooks, revoke the lease, close the stores.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from deepserve.config import ServiceSettings
from deepserve.metrics import start_metrics_server
from deepserve.processes import exit_with_owner
from deepserve.registration import ServiceRegistration
from deepserve.rpc.server import (
    GrpcService,
    Registrar,
    start_grpc_server,
    termination_requested,
)
from deepserve.store.etcd import EtcdStore
from deepserve.store.redis_store import RedisStore
from deepserve.telemetry import setup_telemetry, shutdown_telemetry

log = logging.getLogger(__name__)

Hook = Callable[[], Awaitable[None]]


class ServiceRuntime:
    """Use as `async with ServiceRuntime(...) as rt:` then `await rt.serve(...)`."""

    def __init__(self, name: str, settings: ServiceSettings, *, use_redis: bool = False) -> None:
        self.name = name
        self.settings = settings
        self.common = settings.common
        self.etcd = EtcdStore(self.common.etcd_endpoint)
        self.redis = (
            RedisStore(
                self.common.redis_url,
                max_connections=self.common.redis_max_connections,
                socket_timeout_s=self.common.redis_socket_timeout_s,
            )
            if use_redis
            else None
        )
        self.grpc: GrpcService | None = None
        self.metrics_address = ""
        self.registration: ServiceRegistration | None = None
        self.terminating: asyncio.Event | None = None

    async def __aenter__(self) -> ServiceRuntime:
        # First, so SIGTERM during start-up (loading, registering) still stops the process cleanly.
        self.terminating = termination_requested()
        # A process of a local cluster never outlives the cluster's owner (see processes.py).
        exit_with_owner()
        setup_telemetry(self.name, self.common)
        await self.etcd.connect(wait_s=30)
        if self.redis is not None:
            await self.redis.connect(wait_s=30)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.registration is not None:
            await self.registration.close()
        if self.redis is not None:
            await self.redis.close()
        await self.etcd.close()
        shutdown_telemetry()

    @property
    def address(self) -> str:
        assert self.grpc is not None
        return f"{self.common.host}:{self.grpc.port}"

    async def start(self, registrars: Iterable[Registrar], service_names: Iterable[str]) -> None:
        self.grpc = await start_grpc_server(
            registrars,
            service_names,
            host=self.common.host,
            port=self.settings.grpc_port,
            metrics_label=self.name,
        )
        port = start_metrics_server(self.common.host, self.settings.metrics_port)
        self.metrics_address = f"{self.common.host}:{port}"

    async def register(self, http_address: str = "") -> None:
        self.registration = await ServiceRegistration.register(
            self.etcd,
            self.name,
            self.address,
            self.common.lease_ttl_s,
            http_address=http_address,
            metrics_address=self.metrics_address,
        )
        log.info(
            "serving",
            extra={
                "fields": {
                    "address": self.address,
                    "http_address": http_address,
                    "metrics_address": self.metrics_address,
                }
            },
        )

    async def serve(
        self,
        registrars: Iterable[Registrar],
        service_names: Iterable[str],
        *,
        on_shutdown: Iterable[Hook] = (),
        http_address: str = "",
        stop: asyncio.Event | None = None,
    ) -> None:
        """Starts gRPC, registers, and serves until a signal (or `stop`), then shuts down."""
        if self.grpc is None:
            await self.start(registrars, service_names)
        await self.register(http_address)
        if self.terminating is None:
            self.terminating = termination_requested()
        signal_task = asyncio.create_task(self.terminating.wait())
        waiters: set[asyncio.Future[object]] = {signal_task}  # type: ignore[arg-type]
        if stop is not None:
            waiters.add(asyncio.create_task(stop.wait()))  # type: ignore[arg-type]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        await self.shutdown(on_shutdown)

    async def shutdown(self, hooks: Iterable[Hook]) -> None:
        assert self.grpc is not None
        log.info("shutting down")
        await self.grpc.set_serving(False)
        # Deregister first so routers stop sending work while in-flight calls drain.
        if self.registration is not None:
            await self.registration.close()
            self.registration = None
        await self.grpc.server.stop(self.settings.shutdown_grace_s)
        for hook in hooks:
            try:
                await hook()
            except Exception:
                log.exception("shutdown hook failed")
