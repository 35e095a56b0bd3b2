"""Entry point of the scheduler process: `python -m deepserve.scheduler` / `deepserve scheduler`."""

from __future__ import annotations

import asyncio

from deepserve.config import SchedulerSettings
from deepserve.runtime import ServiceRuntime
from deepserve.scheduler.instance_table import InstanceTable
from deepserve.scheduler.router import Router
from deepserve.scheduler.servicer import SchedulerServicer
from deepserve.v1 import scheduler_pb2, scheduler_pb2_grpc

SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name


async def serve(settings: SchedulerSettings) -> None:
    async with ServiceRuntime("scheduler", settings) as rt:
        table = InstanceTable(rt.etcd)
        table.start()
        servicer = SchedulerServicer(Router(table), table)
        await rt.serve(
            [
                lambda server: scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(
                    servicer, server
                )
            ],
            [SERVICE_NAME],
            on_shutdown=[table.stop],
        )


def main() -> None:
    asyncio.run(serve(SchedulerSettings()))
