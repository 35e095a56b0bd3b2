"""PodPoolService over the pod view."""

from __future__ import annotations

import grpc

from deepserve.errors import Unimplemented
from deepserve.podpool.pod_view import PodView
from deepserve.v1 import podpool_pb2, podpool_pb2_grpc
from deepserve.wire import pod_state_from_proto, pod_to_proto


class PodPoolServicer(podpool_pb2_grpc.PodPoolServiceServicer):
    def __init__(self, view: PodView) -> None:
        self._view = view

    async def ListPods(
        self, request: podpool_pb2.ListPodsRequest, context: grpc.aio.ServicerContext
    ) -> podpool_pb2.ListPodsResponse:
        state = pod_state_from_proto(request.state)
        return podpool_pb2.ListPodsResponse(pods=[pod_to_proto(p) for p in self._view.list(state)])

    async def AcquirePod(
        self, request: podpool_pb2.AcquirePodRequest, context: grpc.aio.ServicerContext
    ) -> podpool_pb2.AcquirePodResponse:
        raise Unimplemented(
            "AcquirePod belongs to the pre-warmed pod pool (control-plane issue #5): "
            "handing warm pods to tasks and refilling the pool"
        )

    async def ReleasePod(
        self, request: podpool_pb2.ReleasePodRequest, context: grpc.aio.ServicerContext
    ) -> podpool_pb2.ReleasePodResponse:
        raise Unimplemented(
            "ReleasePod belongs to the pre-warmed pod pool (control-plane issue #5)"
        )
