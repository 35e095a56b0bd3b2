"""PodHostService: wire types in, HostPods calls out."""

from __future__ import annotations

import grpc

from deepserve.podpool.host_pods import HostPods
from deepserve.v1 import podhost_pb2, podhost_pb2_grpc


class PodHostServicer(podhost_pb2_grpc.PodHostServiceServicer):
    def __init__(self, pods: HostPods) -> None:
        self._pods = pods

    async def CreatePod(
        self, request: podhost_pb2.CreatePodRequest, context: grpc.aio.ServicerContext
    ) -> podhost_pb2.CreatePodResponse:
        await self._pods.create(request.pod_id)
        return podhost_pb2.CreatePodResponse(host=self._pods.host_name)

    async def DeletePod(
        self, request: podhost_pb2.DeletePodRequest, context: grpc.aio.ServicerContext
    ) -> podhost_pb2.DeletePodResponse:
        await self._pods.delete(request.pod_id, request.pid)
        return podhost_pb2.DeletePodResponse()

    async def ListHostPods(
        self, request: podhost_pb2.ListHostPodsRequest, context: grpc.aio.ServicerContext
    ) -> podhost_pb2.ListHostPodsResponse:
        return podhost_pb2.ListHostPodsResponse(
            host=self._pods.host_name, alive_pod_ids=self._pods.alive()
        )
