"""Talks to a pod's FlowServe shell: hand it a model (LoadModel) or take it back (UnloadModel)."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from deepserve.records import Role
from deepserve.rpc.client import insecure_channel
from deepserve.rpc.errors import error_from_rpc
from deepserve.scaling.timeline import ScaleTimeline
from deepserve.scaling.weights_plan import WeightsPlan
from deepserve.scaling.wire import timeline_from_proto, weights_source_to_proto
from deepserve.v1 import flowserve_pb2, flowserve_pb2_grpc
from deepserve.wire import role_to_proto


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What a pod answered to LoadModel."""

    instance_id: str
    load_seconds: float
    # Scale-up steps 2-5 as the pod timed them, and where its weights came from.
    timeline: ScaleTimeline = field(default_factory=ScaleTimeline)


class GrpcPodAgent:
    """The pool's hands on a pod, over the pod's FlowServeService."""

    def __init__(self, load_timeout_s: float = 600.0, unload_timeout_s: float = 60.0) -> None:
        self._load_timeout_s = load_timeout_s
        self._unload_timeout_s = unload_timeout_s

    async def load(
        self,
        address: str,
        *,
        model: str,
        role: Role,
        job_id: str,
        task_id: str,
        tensor_parallel_size: int,
        weights: WeightsPlan | None = None,
    ) -> LoadResult:
        plan = weights or WeightsPlan()
        request = flowserve_pb2.LoadModelRequest(
            model=model,
            role=role_to_proto(role),
            job_id=job_id,
            task_id=task_id,
            tensor_parallel_size=tensor_parallel_size,
            weights_source=weights_source_to_proto(plan.source),
            weights_path=plan.path,
            fork_from=plan.fork_from,
        )
        async with insecure_channel(address) as channel:
            stub = flowserve_pb2_grpc.FlowServeServiceStub(channel)
            try:
                reply = await stub.LoadModel(request, timeout=self._load_timeout_s)
            except grpc.aio.AioRpcError as exc:
                raise error_from_rpc(exc) from None
        return LoadResult(
            reply.instance_id,
            reply.load_seconds,
            timeline_from_proto(reply.steps, reply.weights_source),
        )

    async def unload(self, address: str) -> None:
        async with insecure_channel(address) as channel:
            stub = flowserve_pb2_grpc.FlowServeServiceStub(channel)
            try:
                await stub.UnloadModel(
                    flowserve_pb2.UnloadModelRequest(), timeout=self._unload_timeout_s
                )
            except grpc.aio.AioRpcError as exc:
                raise error_from_rpc(exc) from None
