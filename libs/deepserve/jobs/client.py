"""JobManagerClient: jobmgr's API from the caller's side, in JobRecords and domain errors.

The gateway (and any other client) creates, reads, lists and cancels jobs only through it, so
jobmgr stays the one writer of job records. Failed calls come back as the domain error the
server raised (field and all); a jobmgr that cannot be reached is `Unavailable`.
"""

from __future__ import annotations

import grpc

from deepserve import records
from deepserve.adapters.records import AdapterRecord
from deepserve.adapters.wire import adapter_from_proto, adapter_to_proto
from deepserve.errors import DeadlineExceeded, Unavailable
from deepserve.jobs.batch import BatchSpec
from deepserve.jobs.fine_tuning import FineTuningSpec
from deepserve.jobs.records import JobKind, JobRecord, ServingSpec
from deepserve.jobs.wire import job_from_proto, kind_to_proto, spec_to_proto
from deepserve.rpc.client import insecure_channel
from deepserve.rpc.errors import error_from_rpc
from deepserve.store.etcd import EtcdStore
from deepserve.v1 import jobmgr_pb2 as pb
from deepserve.v1 import jobmgr_pb2_grpc

SERVICE = "jobmgr"


class JobManagerClient:
    """Calls JobManagerService at `address`, or, when that is empty, at a live jobmgr that the
    service registry in etcd lists (any replica answers; only the leader reconciles)."""

    def __init__(
        self, address: str = "", *, etcd: EtcdStore | None = None, timeout_s: float = 10.0
    ) -> None:
        if not address and etcd is None:
            raise ValueError("a jobmgr address or an etcd store to discover one is required")
        self._fixed = address
        self._etcd = etcd
        self._timeout_s = timeout_s
        self._address = ""
        self._channel: grpc.aio.Channel | None = None
        self._stub: jobmgr_pb2_grpc.JobManagerServiceStub | None = None

    async def create(
        self, spec: ServingSpec | FineTuningSpec | BatchSpec, job_id: str = ""
    ) -> JobRecord:
        request = pb.CreateJobRequest(spec=spec_to_proto(spec), job_id=job_id)
        reply: pb.CreateJobResponse = await self._call("CreateJob", request)
        return job_from_proto(reply.job).record

    async def get(self, job_id: str, *, tenant: str = "", kind: JobKind | None = None) -> JobRecord:
        """The job; with `tenant` (`kind`) set, one of another tenant (kind) is NotFound."""
        request = pb.GetJobRequest(job_id=job_id, tenant=tenant, kind=kind_to_proto(kind))
        reply: pb.GetJobResponse = await self._call("GetJob", request)
        return job_from_proto(reply.job).record

    async def list(self, kind: JobKind | None = None, *, tenant: str = "") -> list[JobRecord]:
        request = pb.ListJobsRequest(kind=kind_to_proto(kind), tenant=tenant)
        reply: pb.ListJobsResponse = await self._call("ListJobs", request)
        return [job_from_proto(job).record for job in reply.jobs]

    async def cancel(
        self, job_id: str, *, tenant: str = "", kind: JobKind | None = None
    ) -> JobRecord:
        request = pb.CancelJobRequest(job_id=job_id, tenant=tenant, kind=kind_to_proto(kind))
        reply: pb.CancelJobResponse = await self._call("CancelJob", request)
        return job_from_proto(reply.job).record

    async def register_adapter(self, record: AdapterRecord) -> AdapterRecord:
        request = pb.RegisterAdapterRequest(adapter=adapter_to_proto(record))
        reply: pb.RegisterAdapterResponse = await self._call("RegisterAdapter", request)
        return adapter_from_proto(reply.adapter)

    async def delete_adapter(self, tenant: str, name: str) -> None:
        await self._call("DeleteAdapter", pb.DeleteAdapterRequest(tenant=tenant, name=name))

    async def list_adapters(self, tenant: str = "") -> list[AdapterRecord]:
        reply: pb.ListAdaptersResponse = await self._call(
            "ListAdapters", pb.ListAdaptersRequest(tenant=tenant)
        )
        return [adapter_from_proto(a) for a in reply.adapters]

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel, self._stub, self._address = None, None, ""

    # --- calls -----------------------------------------------------------------------------

    async def _call(self, method: str, request: object) -> object:
        stub = await self._connect()
        address = self._address
        try:
            return await getattr(stub, method)(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            err = error_from_rpc(exc)
            if isinstance(err, Unavailable | DeadlineExceeded):
                if not self._fixed:
                    await self.close()  # the next call looks for a live jobmgr again
                raise Unavailable(f"jobmgr at {address} cannot be reached: {err.message}") from exc
            raise err from None

    async def _connect(self) -> jobmgr_pb2_grpc.JobManagerServiceStub:
        address = self._fixed or await self._discover()
        if self._stub is None or address != self._address:
            await self.close()
            self._channel = insecure_channel(address)
            self._stub = jobmgr_pb2_grpc.JobManagerServiceStub(self._channel)
            self._address = address
        return self._stub

    async def _discover(self) -> str:
        """The jobmgr in use if it is still registered, else the longest-running live one."""
        assert self._etcd is not None
        found, _ = await records.services(self._etcd, SERVICE).list()
        live = sorted((s.record for s in found), key=lambda r: r.started_at)
        if not live:
            raise Unavailable("no jobmgr is registered; job requests cannot be served now")
        if self._address in {r.address for r in live}:
            return self._address
        return live[0].address
