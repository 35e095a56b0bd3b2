"""JobManagerService over the JobStore: check the request, call the domain, convert the reply."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from deepserve.adapters.wire import adapter_from_proto, adapter_to_proto
from deepserve.jobmgr.adapter_registry import AdapterRegistry
from deepserve.jobmgr.job_admission import JobAdmission
from deepserve.jobmgr.task_store import TaskStore
from deepserve.jobmgr.task_wire import task_to_proto
from deepserve.jobs.store import JobStore
from deepserve.jobs.wire import job_to_proto, kind_from_proto, spec_from_proto
from deepserve.v1 import jobmgr_pb2 as pb
from deepserve.v1 import jobmgr_pb2_grpc


class JobManagerServicer(jobmgr_pb2_grpc.JobManagerServiceServicer):
    def __init__(
        self,
        jobs: JobStore,
        tasks: TaskStore,
        admission: JobAdmission,
        adapters: AdapterRegistry,
    ) -> None:
        self._jobs = jobs
        self._tasks = tasks
        self._admission = admission
        self._adapters = adapters

    async def CreateJob(
        self, request: pb.CreateJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateJobResponse:
        job = await self._admission.create(spec_from_proto(request.spec), request.job_id)
        return pb.CreateJobResponse(job=job_to_proto(job))

    async def GetJob(
        self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetJobResponse:
        job = await self._jobs.get(
            request.job_id, tenant=request.tenant or None, kind=kind_from_proto(request.kind)
        )
        tasks = await self._tasks.list(request.job_id)
        return pb.GetJobResponse(job=job_to_proto(job), tasks=[task_to_proto(t) for t in tasks])

    async def ListJobs(
        self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListJobsResponse:
        jobs = await self._jobs.list(kind_from_proto(request.kind), tenant=request.tenant or None)
        return pb.ListJobsResponse(jobs=[job_to_proto(j) for j in jobs])

    async def WatchJobs(
        self, request: pb.WatchJobsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchJobsResponse]:
        async for change in self._jobs.watch(kind_from_proto(request.kind)):
            if change.kind == "delete" or change.job is None:
                yield pb.WatchJobsResponse(
                    change=pb.JOB_CHANGE_DELETE, job=pb.Job(job_id=change.job_id)
                )
            else:
                yield pb.WatchJobsResponse(change=pb.JOB_CHANGE_PUT, job=job_to_proto(change.job))

    async def CancelJob(
        self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelJobResponse:
        job = await self._jobs.cancel(
            request.job_id, tenant=request.tenant or None, kind=kind_from_proto(request.kind)
        )
        return pb.CancelJobResponse(job=job_to_proto(job))

    async def ScaleJob(
        self, request: pb.ScaleJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScaleJobResponse:
        job = await self._jobs.scale(request.job_id, request.replicas)
        return pb.ScaleJobResponse(job=job_to_proto(job))

    async def DeleteJob(
        self, request: pb.DeleteJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteJobResponse:
        return pb.DeleteJobResponse(job=job_to_proto(await self._jobs.delete(request.job_id)))

    async def ListTasks(
        self, request: pb.ListTasksRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListTasksResponse:
        tasks = await self._tasks.list(request.job_id or None)
        return pb.ListTasksResponse(tasks=[task_to_proto(t) for t in tasks])

    async def RegisterAdapter(
        self, request: pb.RegisterAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterAdapterResponse:
        record = await self._adapters.register(adapter_from_proto(request.adapter))
        return pb.RegisterAdapterResponse(adapter=adapter_to_proto(record))

    async def DeleteAdapter(
        self, request: pb.DeleteAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteAdapterResponse:
        await self._adapters.delete(request.tenant, request.name)
        return pb.DeleteAdapterResponse()

    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAdaptersResponse:
        found = await self._adapters.list(request.tenant)
        return pb.ListAdaptersResponse(adapters=[adapter_to_proto(r) for r in found])
