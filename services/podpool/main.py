"""Entry point of the podpool process: `python -m deepserve.podpool` / `deepserve podpool`."""

from __future__ import annotations

import asyncio

from deepserve.config import PodPoolSettings
from deepserve.podpool.pod_view import PodView
from deepserve.podpool.servicer import PodPoolServicer
from deepserve.runtime import ServiceRuntime
from deepserve.v1 import podpool_pb2, podpool_pb2_grpc

SERVICE_NAME = podpool_pb2.DESCRIPTOR.services_by_name["PodPoolService"].full_name


async def serve(settings: PodPoolSettings) -> None:
    async with ServiceRuntime("podpool", settings) as rt:
        view = PodView(rt.etcd)
        view.start()
        servicer = PodPoolServicer(view)
        await rt.serve(
            [
                lambda server: podpool_pb2_grpc.add_PodPoolServiceServicer_to_server(
                    servicer, server
                )
            ],
            [SERVICE_NAME],
            on_shutdown=[view.stop],
        )


def main() -> None:
    asyncio.run(serve(PodPoolSettings()))
