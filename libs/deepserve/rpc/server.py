"""Bootstrap of a service's grpc.aio server: health, reflection, interceptors, SIGTERM.

Each service's entry point builds its servicers, then calls `run_grpc_server`, which serves until
SIGTERM or SIGINT and then shuts down gracefully: health flips to NOT_SERVING, in-flight RPCs get
`grace_s` to finish, then `on_shutdown` hooks release leases and connections.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from deepserve.metrics import RpcMetricsInterceptor
from deepserve.rpc.client import CHANNEL_OPTIONS
from deepserve.rpc.errors import DomainErrorInterceptor
from deepserve.telemetry import grpc_server_interceptors

# Clients ping every 20 s (CHANNEL_OPTIONS), also while a stream sends nothing (a long prefill
# on a loaded host). The server's default accepts such pings only every 5 min and answers the
# third with GOAWAY "too_many_pings", which killed Generate streams mid-way under load.
SERVER_OPTIONS: list[tuple[str, object]] = [
    *CHANNEL_OPTIONS,
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
]

log = logging.getLogger(__name__)

Registrar = Callable[[grpc.aio.Server], None]


class GrpcService:
    """A started grpc.aio server with its health servicer."""

    def __init__(
        self,
        server: grpc.aio.Server,
        health_servicer: health.aio.HealthServicer,
        port: int,
        names: list[str],
    ) -> None:
        self.server = server
        self.health = health_servicer
        self.port = port
        self.names = names

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.names]:
            await self.health.set(name, status)


async def start_grpc_server(
    registrars: Iterable[Registrar],
    service_names: Iterable[str],
    *,
    host: str,
    port: int,
    metrics_label: str = "",
) -> GrpcService:
    """Starts a server with the given servicers plus health and reflection; port 0 picks one."""
    # Outermost first. Metrics see the mapped status code; domain errors are mapped outside the
    # tracing relay so a stream's last messages reach the client before its error status.
    server = grpc.aio.server(
        interceptors=[
            RpcMetricsInterceptor(metrics_label or "unknown"),
            DomainErrorInterceptor(),
            *grpc_server_interceptors(),
        ],
        options=SERVER_OPTIONS,
    )
    for register in registrars:
        register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    reflection.enable_server_reflection(
        [
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC port {host}:{port}")
    await server.start()
    service = GrpcService(server, health_servicer, bound, names)
    await service.set_serving(True)
    return service


def termination_requested() -> asyncio.Event:
    """An event set on the first SIGTERM or SIGINT, from the moment this is called.

    Installed as a process starts (not when it begins serving), so a signal that arrives while
    the service is still starting ends it cleanly once it can, instead of killing it outright
    and leaving its etcd records to expire.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
