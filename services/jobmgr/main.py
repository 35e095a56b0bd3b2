"""Entry point of the job manager process: `python -m deepserve.jobmgr` / `deepserve jobmgr`."""

from __future__ import annotations

import asyncio

from deepserve.config import JobMgrSettings
from deepserve.jobmgr.job_store import JobStore
from deepserve.jobmgr.servicer import JobManagerServicer
from deepserve.runtime import ServiceRuntime
from deepserve.v1 import jobmgr_pb2, jobmgr_pb2_grpc

SERVICE_NAME = jobmgr_pb2.DESCRIPTOR.services_by_name["JobManagerService"].full_name


async def serve(settings: JobMgrSettings) -> None:
    async with ServiceRuntime("jobmgr", settings) as rt:
        servicer = JobManagerServicer(JobStore(rt.etcd))
        await rt.serve(
            [
                lambda server: jobmgr_pb2_grpc.add_JobManagerServiceServicer_to_server(
                    servicer, server
                )
            ],
            [SERVICE_NAME],
        )


def main() -> None:
    asyncio.run(serve(JobMgrSettings()))
