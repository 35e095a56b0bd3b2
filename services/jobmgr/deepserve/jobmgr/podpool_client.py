"""The PodProvider over podpool's gRPC API."""

from __future__ import annotations

import grpc

from deepserve.jobmgr.pod_provider import PodAsk, PodGrant
from deepserve.rpc.client import insecure_channel
from deepserve.rpc.errors import error_from_rpc
from deepserve.scaling.wire import timeline_from_proto
from deepserve.v1 import podpool_pb2, podpool_pb2_grpc
from deepserve.wire import purpose_to_proto, role_to_proto


class PodPoolClient:
    """Calls PodPoolService.AcquirePod / ReleasePod on one podpool address."""

    def __init__(self, address: str, *, acquire_timeout_s: float = 300.0) -> None:
        self._channel = insecure_channel(address)
        self._stub = podpool_pb2_grpc.PodPoolServiceStub(self._channel)
        self._acquire_timeout_s = acquire_timeout_s

    async def acquire(self, ask: PodAsk) -> PodGrant:
        request = podpool_pb2.AcquirePodRequest(
            task_id=ask.task_id,
            job_id=ask.job_id,
            model=ask.model,
            role=role_to_proto(ask.role),
            tensor_parallel_size=ask.tensor_parallel_size,
            purpose=purpose_to_proto(ask.purpose),
        )
        try:
            reply = await self._stub.AcquirePod(request, timeout=self._acquire_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        return PodGrant(
            pod_id=reply.pod.pod_id,
            address=reply.pod.address,
            instance_id=reply.instance_id,
            cold_start=reply.cold_start,
            claim_seconds=reply.claim_seconds,
            load_seconds=reply.load_seconds,
            timeline=timeline_from_proto(reply.steps, reply.weights_source),
        )

    async def release(self, pod_id: str, *, terminate: bool = False) -> None:
        try:
            await self._stub.ReleasePod(
                podpool_pb2.ReleasePodRequest(pod_id=pod_id, terminate=terminate), timeout=120
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None

    async def close(self) -> None:
        await self._channel.close()
