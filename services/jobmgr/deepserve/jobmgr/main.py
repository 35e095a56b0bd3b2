"""Entry point of the job manager process: `python -m deepserve.jobmgr` / `deepserve jobmgr`."""

from __future__ import annotations

import asyncio

from deepserve.files import FileService, LocalFileStore
from deepserve.jobmgr.adapter_registry import AdapterRegistry
from deepserve.jobmgr.autoscaler_loop import Autoscaler
from deepserve.jobmgr.batch.controller import BatchController
from deepserve.jobmgr.batch.line_runner import BatchLineRunner
from deepserve.jobmgr.batch.settings import BatchSettings
from deepserve.jobmgr.controller import JobController
from deepserve.jobmgr.fine_tuning.controller import FineTuningController
from deepserve.jobmgr.job_admission import JobAdmission
from deepserve.jobmgr.podpool_client import PodPoolClient
from deepserve.jobmgr.servicer import JobManagerServicer
from deepserve.jobmgr.settings import JobMgrSettings
from deepserve.jobmgr.task_store import TaskStore
from deepserve.jobs.store import JobStore
from deepserve.models.catalog import default_cache_dir
from deepserve.records import InstanceRecord
from deepserve.registration import new_process_id
from deepserve.runtime import ServiceRuntime
from deepserve.tenancy.usage import UsageMeter
from deepserve.v1 import jobmgr_pb2, jobmgr_pb2_grpc

SERVICE_NAME = jobmgr_pb2.DESCRIPTOR.services_by_name["JobManagerService"].full_name


async def serve(settings: JobMgrSettings) -> None:
    async with ServiceRuntime("jobmgr", settings, use_redis=True) as rt:
        files = FileService(
            rt.etcd, LocalFileStore(rt.common.files_root), max_bytes=rt.common.files_max_bytes
        )
        batch_settings = BatchSettings()
        adapters = AdapterRegistry(
            rt.etcd, model_cache_dir=default_cache_dir(), max_rank=rt.common.lora_max_rank
        )

        def live_instances(model: str) -> list[InstanceRecord]:
            return [i for i in controller.instance_mirror.items.values() if i.model == model]

        assert rt.redis is not None
        batch_runner = BatchLineRunner(
            rt.etcd, batch_settings, live_instances, usage=UsageMeter(rt.redis.client)
        )
        pods = PodPoolClient(settings.podpool_address, acquire_timeout_s=settings.acquire_timeout_s)
        autoscaler = Autoscaler(
            rt.etcd,
            lambda: controller.instance_mirror.items,
            rt.redis,
            interval_s=settings.autoscale_interval_s,
            demand_ttl_s=settings.demand_ttl_s,
            slo_window_s=settings.slo_window_s,
        )
        controller = JobController(
            rt.etcd,
            pods,
            candidate_id=new_process_id("jobmgr"),
            election_ttl_s=settings.election_ttl_s,
            resync_interval_s=settings.resync_interval_s,
            acquire_timeout_s=settings.acquire_timeout_s,
            backoff_s=settings.retry_backoff_s,
            backoff_max_s=settings.retry_backoff_max_s,
            autoscaler=autoscaler,
            workloads=[
                FineTuningController(
                    rt.etcd,
                    pods,
                    lambda: controller.pod_mirror.items,
                    files,
                    adapters=adapters,
                ),
                BatchController(rt.etcd, files, batch_runner, batch_settings),
            ],
        )
        controller.start()
        jobs = JobStore(rt.etcd)
        servicer = JobManagerServicer(jobs, TaskStore(rt.etcd), JobAdmission(jobs, files), adapters)
        await rt.serve(
            [
                lambda server: jobmgr_pb2_grpc.add_JobManagerServiceServicer_to_server(
                    servicer, server
                )
            ],
            [SERVICE_NAME],
            on_shutdown=[controller.stop, pods.close, batch_runner.close],
        )


def main() -> None:
    asyncio.run(serve(JobMgrSettings()))
