"""PodPoolService: wire types in, WarmPodPool calls out."""

from __future__ import annotations

import grpc

from deepserve.errors import InvalidArgument
from deepserve.podpool.pod_view import PodView
from deepserve.podpool.warm_pool import PodRequest, WarmPodPool
from deepserve.scaling.wire import steps_to_proto, weights_source_to_proto
from deepserve.v1 import podpool_pb2, podpool_pb2_grpc
from deepserve.wire import pod_state_from_proto, pod_to_proto, purpose_from_proto, role_from_proto


class PodPoolServicer(podpool_pb2_grpc.PodPoolServiceServicer):
    def __init__(self, view: PodView, pool: WarmPodPool) -> None:
        self._view = view
        self._pool = pool

    async def ListPods(
        self, request: podpool_pb2.ListPodsRequest, context: grpc.aio.ServicerContext
    ) -> podpool_pb2.ListPodsResponse:
        state = pod_state_from_proto(request.state)
        return podpool_pb2.ListPodsResponse(
            pods=[pod_to_proto(p) for p in self._view.list(state)],
            warm_target=self._pool.warm_target,
            cold_starts=self._pool.cold_starts,
            warm_hits=self._pool.warm_hits,
            dram_copies=self._dram_copies(),
        )

    def _dram_copies(self) -> list[podpool_pb2.DramCopy]:
        planner = self._pool.planner
        if planner is None or planner.dram is None:
            return []
        return [
            podpool_pb2.DramCopy(
                model=c.model,
                host=planner.host,
                path=c.path,
                nbytes=c.nbytes,
                pinned=c.pinned,
                ready=c.ready,
            )
            for c in planner.dram.copies()
        ]

    async def AcquirePod(
        self, request: podpool_pb2.AcquirePodRequest, context: grpc.aio.ServicerContext
    ) -> podpool_pb2.AcquirePodResponse:
        if not request.task_id:
            raise InvalidArgument("a task id is required", field="task_id")
        if not request.model:
            raise InvalidArgument("a model is required", field="model")
        acquired = await self._pool.acquire(
            PodRequest(
                task_id=request.task_id,
                model=request.model,
                role=role_from_proto(request.role),
                job_id=request.job_id,
                tensor_parallel_size=request.tensor_parallel_size or 1,
                purpose=purpose_from_proto(request.purpose),
            )
        )
        return podpool_pb2.AcquirePodResponse(
            pod=pod_to_proto(acquired.pod),
            cold_start=acquired.cold_start,
            instance_id=acquired.instance_id,
            load_seconds=acquired.load_seconds,
            claim_seconds=acquired.claim_seconds,
            steps=steps_to_proto(acquired.timeline),
            weights_source=weights_source_to_proto(acquired.timeline.weights_source),
        )

    async def ReleasePod(
        self, request: podpool_pb2.ReleasePodRequest, context: grpc.aio.ServicerContext
    ) -> podpool_pb2.ReleasePodResponse:
        if not request.pod_id:
            raise InvalidArgument("a pod id is required", field="pod_id")
        await self._pool.release(request.pod_id, terminate=request.terminate)
        return podpool_pb2.ReleasePodResponse()
