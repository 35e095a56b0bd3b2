"""An echo engine behind a real FlowServeService gRPC server, for gateway tests.

It streams the prompt's own tokens back, one per message (text decoded with the real
tokenizer), so a test knows exactly which text every request must get. Knobs make it slow,
refuse, or die mid-stream; it records which requests it saw and which were cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from deepserve.rpc.server import GrpcService, start_grpc_server
from deepserve.tokenizer import Tokenizer
from deepserve.v1 import common_pb2, flowserve_pb2, flowserve_pb2_grpc


@dataclass
class EchoBehaviour:
    """How the echo engine answers; tests change it between requests."""

    token_delay_s: float = 0.0
    # Abort the RPC with this status before the first token (e.g. RESOURCE_EXHAUSTED).
    refuse_with: grpc.StatusCode | None = None
    # Stop the whole server after this many tokens of a request (the engine "dies").
    die_after_tokens: int | None = None
    # Mark the request failed (FINISH_REASON_ERROR) after this many tokens.
    error_after_tokens: int | None = None


@dataclass
class EchoRecord:
    seen: list[flowserve_pb2.GenerateRequest] = field(default_factory=list)
    cancelled: set[str] = field(default_factory=set)
    finished: set[str] = field(default_factory=set)
    # Contexts pinned through PinContext, by id.
    pinned: dict[str, flowserve_pb2.PinContextRequest] = field(default_factory=dict)


class EchoEngine(flowserve_pb2_grpc.FlowServeServiceServicer):
    """Echoes prompt tokens; honours max_tokens, stop_token_ids, logprobs and resumed tokens
    (a migrated request continues the echo after the tokens it already has)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.behaviour = EchoBehaviour()
        self.record = EchoRecord()
        self.service: GrpcService | None = None
        self.address = ""

    async def start(self) -> str:
        self.service = await start_grpc_server(
            [lambda s: flowserve_pb2_grpc.add_FlowServeServiceServicer_to_server(self, s)],
            ["deepserve.v1.FlowServeService"],
            host="127.0.0.1",
            port=0,
        )
        self.address = f"127.0.0.1:{self.service.port}"
        return self.address

    async def stop(self) -> None:
        if self.service is not None:
            await self.service.server.stop(0)

    async def Generate(
        self, request: flowserve_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[flowserve_pb2.GenerateResponse]:
        self.record.seen.append(request)
        b = self.behaviour
        if b.refuse_with is not None:
            await context.abort(b.refuse_with, "echo engine refuses")
        prompt = list(request.prompt_token_ids)
        limit = request.sampling.max_tokens or len(prompt)
        total = min(limit, len(prompt))
        reason = (
            common_pb2.FINISH_REASON_LENGTH
            if limit < len(prompt)
            else common_pb2.FINISH_REASON_STOP
        )
        try:
            for i in range(len(request.output_token_ids), total):
                if b.token_delay_s:
                    await asyncio.sleep(b.token_delay_s)
                if b.die_after_tokens is not None and i >= b.die_after_tokens:
                    assert self.service is not None
                    asyncio.get_running_loop().create_task(self.service.server.stop(0))
                    await asyncio.sleep(10)
                token = prompt[i]
                reply = flowserve_pb2.GenerateResponse(
                    request_id=request.request_id,
                    token_ids=[token],
                    text=self.tokenizer.decode([token]),
                )
                if request.sampling.logprobs:
                    entry = reply.logprobs.add()
                    entry.chosen.token_id = token
                    entry.chosen.logprob = -0.5
                    for k in range(request.sampling.top_logprobs):
                        entry.top.add(token_id=token + k, logprob=-0.5 - k)
                last = i == total - 1
                if b.error_after_tokens is not None and i >= b.error_after_tokens:
                    reply.finish_reason = common_pb2.FINISH_REASON_ERROR
                    yield reply
                    return
                if last or token in request.sampling.stop_token_ids:
                    reply.finish_reason = (
                        common_pb2.FINISH_REASON_STOP
                        if token in request.sampling.stop_token_ids
                        else reason
                    )
                    reply.usage.prompt_tokens = len(prompt)
                    reply.usage.completion_tokens = i + 1
                    reply.usage.total_tokens = len(prompt) + i + 1
                    self.record.finished.add(request.request_id)
                    yield reply
                    return
                yield reply
        except asyncio.CancelledError:
            self.record.cancelled.add(request.request_id)
            raise

    async def Abort(
        self, request: flowserve_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> flowserve_pb2.AbortResponse:
        return flowserve_pb2.AbortResponse(aborted=False)

    async def PinContext(
        self, request: flowserve_pb2.PinContextRequest, context: grpc.aio.ServicerContext
    ) -> flowserve_pb2.PinContextResponse:
        self.record.pinned[request.context_id] = request
        return flowserve_pb2.PinContextResponse(
            pinned_tokens=len(request.prompt_token_ids) // 16 * 16
        )

    async def UnpinContext(
        self, request: flowserve_pb2.UnpinContextRequest, context: grpc.aio.ServicerContext
    ) -> flowserve_pb2.UnpinContextResponse:
        found = self.record.pinned.pop(request.context_id, None)
        return flowserve_pb2.UnpinContextResponse(unpinned=found is not None)
