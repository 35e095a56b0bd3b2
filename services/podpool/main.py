"""Entry point of the podpool process: `python -m deepserve.podpool` / `deepserve podpool`."""

from __future__ import annotations

import asyncio

from deepserve.config import PodPoolSettings
from deepserve.errors import InvalidArgument
from deepserve.podpool.backend import PodBackend
from deepserve.podpool.local_backend import LocalProcessBackend
from deepserve.podpool.pod_agent import GrpcPodAgent
from deepserve.podpool.pod_view import PodView
from deepserve.podpool.servicer import PodPoolServicer
from deepserve.podpool.warm_pool import WarmPodPool
from deepserve.runtime import ServiceRuntime
from deepserve.v1 import podpool_pb2, podpool_pb2_grpc

SERVICE_NAME = podpool_pb2.DESCRIPTOR.services_by_name["PodPoolService"].full_name


def make_backend(settings: PodPoolSettings) -> PodBackend:
    if settings.backend == "local":
        return LocalProcessBackend(settings)
    raise InvalidArgument(
        f"unknown pod backend {settings.backend!r} (only 'local' exists so far)", field="backend"
    )


async def serve(settings: PodPoolSettings) -> None:
    async with ServiceRuntime("podpool", settings) as rt:
        view = PodView(rt.etcd)
        view.start()
        pool = WarmPodPool(
            view,
            make_backend(settings),
            GrpcPodAgent(),
            warm_target=settings.warm_pods,
            max_pods=settings.max_pods,
            start_timeout_s=settings.pod_start_timeout_s,
        )
        pool.start()
        servicer = PodPoolServicer(view, pool)
        await rt.serve(
            [
                lambda server: podpool_pb2_grpc.add_PodPoolServiceServicer_to_server(
                    servicer, server
                )
            ],
            [SERVICE_NAME],
            on_shutdown=[pool.close, view.stop],
        )


def main() -> None:
    asyncio.run(serve(PodPoolSettings()))
