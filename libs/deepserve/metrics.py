"""Prometheus metrics: one registry per process, served as text on `/metrics`.

Every service exposes the RPC metrics recorded by `RpcMetricsInterceptor`; services add their
own (engine queue and KV figures, route decisions, scale-up steps) through `registry()`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from deepserve.rpc.interceptor_base import MethodWrappingInterceptor, StreamBehavior, UnaryBehavior

_REGISTRY = CollectorRegistry(auto_describe=True)

# Buckets for request latencies, from a few ms (a cache hit) to minutes (long generations).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Per-token latencies are shorter.
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


def registry() -> CollectorRegistry:
    return _REGISTRY


def start_metrics_server(host: str, port: int) -> int:
    """Serves /metrics from a background thread; returns the bound port (port 0 picks one)."""
    server, _thread = start_http_server(port, addr=host, registry=_REGISTRY)
    return int(server.server_port)


RPC_REQUESTS = Counter(
    "deepserve_rpc_requests",
    "gRPC calls handled, by method and status code",
    ["service", "method", "code"],
    registry=_REGISTRY,
)
RPC_LATENCY = Histogram(
    "deepserve_rpc_latency_seconds",
    "gRPC call duration (to the last message for streams)",
    ["service", "method"],
    buckets=LATENCY_BUCKETS,
    registry=_REGISTRY,
)


def _code_of(context: grpc.aio.ServicerContext, failed: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(failed, asyncio.CancelledError):
        return "CANCELLED"  # the client went away
    return "UNKNOWN" if failed is not None else "OK"


class RpcMetricsInterceptor(MethodWrappingInterceptor):
    """Counts calls by status code and times them, for unary and server-streaming RPCs."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def _record(
        self, method: str, started: float, context: Any, failed: BaseException | None
    ) -> None:
        RPC_REQUESTS.labels(self.service, method, _code_of(context, failed)).inc()
        RPC_LATENCY.labels(self.service, method).observe(time.perf_counter() - started)

    def wrap_unary(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior:
        name = method.rsplit("/", 1)[-1]

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started, failed = time.perf_counter(), None
            try:
                return await behavior(request, context)
            except BaseException as exc:
                failed = exc
                raise
            finally:
                self._record(name, started, context, failed)

        return unary_unary

    def wrap_stream(self, method: str, behavior: StreamBehavior) -> StreamBehavior:
        name = method.rsplit("/", 1)[-1]

        async def unary_stream(
            request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            started, failed = time.perf_counter(), None
            try:
                async for item in behavior(request, context):
                    yield item
            except BaseException as exc:
                failed = exc
                raise
            finally:
                self._record(name, started, context, failed)

        return unary_stream
