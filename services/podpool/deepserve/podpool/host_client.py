"""Podpool's calls to a host agent's PodHostService."""

from __future__ import annotations

import grpc

from deepserve.rpc.client import insecure_channel
from deepserve.rpc.errors import error_from_rpc
from deepserve.v1 import podhost_pb2, podhost_pb2_grpc


class GrpcHostClient:
    """One channel per agent address, kept while the agent is registered."""

    def __init__(self, timeout_s: float = 15.0) -> None:
        self._timeout_s = timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, address: str) -> podhost_pb2_grpc.PodHostServiceStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = insecure_channel(address)
        return podhost_pb2_grpc.PodHostServiceStub(channel)

    async def create_pod(self, address: str, pod_id: str) -> str:
        """Starts `pod_id` on that host; returns the host's name."""
        try:
            reply = await self._stub(address).CreatePod(
                podhost_pb2.CreatePodRequest(pod_id=pod_id), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from exc
        return reply.host

    async def delete_pod(self, address: str, pod_id: str, pid: int) -> None:
        try:
            await self._stub(address).DeletePod(
                podhost_pb2.DeletePodRequest(pod_id=pod_id, pid=pid), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from exc

    async def list_pods(self, address: str) -> tuple[str, list[str]]:
        """(host name, ids of the pods alive there that the agent started)."""
        try:
            reply = await self._stub(address).ListHostPods(
                podhost_pb2.ListHostPodsRequest(), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from exc
        return reply.host, list(reply.alive_pod_ids)

    async def forget(self, address: str) -> None:
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close()

    async def close(self) -> None:
        for address in list(self._channels):
            await self.forget(address)
