"""Calls RunTraining on a pod and yields its events (the train stage's wire edge)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from deepserve.rpc.client import insecure_channel
from deepserve.rpc.errors import error_from_rpc
from deepserve.v1 import flowserve_pb2, flowserve_pb2_grpc


async def run_training(
    address: str, request: flowserve_pb2.RunTrainingRequest
) -> AsyncIterator[flowserve_pb2.RunTrainingResponse]:
    """The run's events; leaving the loop early cancels the call (and stops the training)."""
    channel = insecure_channel(address)
    try:
        call = flowserve_pb2_grpc.FlowServeServiceStub(channel).RunTraining(request)
        try:
            async for reply in call:
                yield reply
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()
    finally:
        await channel.close()
