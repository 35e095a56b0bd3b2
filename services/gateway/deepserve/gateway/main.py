"""Entry point of the gateway process: `python -m deepserve.gateway` / `deepserve gateway`."""

from __future__ import annotations

import asyncio
import sys

from deepserve.errors import DeepServeError
from deepserve.gateway.auth import check_open_mode
from deepserve.gateway.gateway import Gateway
from deepserve.gateway.http_app import create_app
from deepserve.gateway.http_server import HttpServer
from deepserve.gateway.platform_routes import platform_routers
from deepserve.gateway.servicer import GatewayServicer
from deepserve.gateway.settings import GatewaySettings
from deepserve.jobs.client import JobManagerClient
from deepserve.runtime import ServiceRuntime
from deepserve.v1 import gateway_pb2, gateway_pb2_grpc

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name


async def serve(settings: GatewaySettings) -> None:
    # Before anything listens: an open gateway on a public address serves anyone.
    check_open_mode(settings, settings.common.host)
    async with ServiceRuntime("gateway", settings, use_redis=True) as rt:
        assert rt.redis is not None
        gateway = Gateway.build(settings, rt.etcd, rt.redis.client)
        await gateway.start()
        servicer = GatewayServicer(gateway)
        jobs = JobManagerClient(
            settings.jobmgr_address, etcd=rt.etcd, timeout_s=settings.jobmgr_timeout_s
        )
        http = HttpServer(
            create_app(gateway, platform_routers(rt.etcd, rt.common, jobs)),
            rt.common.host,
            settings.http_port,
        )
        http_port = await http.start()
        await rt.serve(
            [
                lambda server: gateway_pb2_grpc.add_GatewayServiceServicer_to_server(
                    servicer, server
                )
            ],
            [SERVICE_NAME],
            on_shutdown=[http.stop, gateway.stop, jobs.close],
            http_address=f"{rt.common.host}:{http_port}",
        )


def main() -> None:
    settings = GatewaySettings()
    try:
        check_open_mode(settings, settings.common.host)
    except DeepServeError as exc:
        sys.exit(f"gateway: {exc}")
    asyncio.run(serve(settings))
