"""gRPC health checks of service processes."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deepserve.rpc.client import insecure_channel


async def check_health(address: str, service: str = "", timeout_s: float = 2.0) -> str:
    """The serving status name (SERVING, NOT_SERVING, ...) or UNREACHABLE."""
    async with insecure_channel(address, traced=False) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.aio.AioRpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


async def wait_serving(address: str, timeout_s: float) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        if await check_health(address, timeout_s=1.0) == "SERVING":
            return True
        await asyncio.sleep(0.1)
    return False
