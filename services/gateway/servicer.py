"""GatewayService: the gRPC face of the gateway."""

from __future__ import annotations

import grpc

from deepserve.errors import Unimplemented
from deepserve.gateway.model_directory import ModelDirectory
from deepserve.v1 import gateway_pb2 as pb
from deepserve.v1 import gateway_pb2_grpc

_COMPLETIONS = (
    "chat and text completions through the gateway belong to the gateway issue (#4): "
    "tokenization, routing and streaming end to end"
)


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, models: ModelDirectory) -> None:
        self._models = models

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[
                pb.ModelCard(
                    id=c.model_id,
                    owned_by=c.owned_by,
                    created_unix=c.created_at,
                    instances=c.instances,
                )
                for c in self._models.list()
            ]
        )

    async def CreateChatCompletion(self, request, context):  # type: ignore[no-untyped-def]
        raise Unimplemented(_COMPLETIONS)

    async def StreamChatCompletion(self, request, context):  # type: ignore[no-untyped-def]
        raise Unimplemented(_COMPLETIONS)

    async def CreateCompletion(self, request, context):  # type: ignore[no-untyped-def]
        raise Unimplemented(_COMPLETIONS)

    async def StreamCompletion(self, request, context):  # type: ignore[no-untyped-def]
        raise Unimplemented(_COMPLETIONS)
