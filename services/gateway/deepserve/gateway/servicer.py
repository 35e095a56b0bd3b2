"""GatewayService: the gRPC face of the gateway, over the same request path as HTTP.

Wire messages become the OpenAI request models, so validation, limits and accounting are the
HTTP API's. Proto3 cannot tell an unset field from a zero, so zeros mean "the default" except
where zero is meaningful (temperature 0 is greedy, as the SamplingParams proto documents).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from pydantic import BaseModel, ValidationError

from deepserve.completions.call import ApiCall, CallUsage
from deepserve.completions.dispatcher import ChoiceDelta
from deepserve.completions.protocol import ChatCompletionRequest, CompletionRequest
from deepserve.errors import InvalidArgument
from deepserve.gateway.gateway import Gateway
from deepserve.gateway.request_ids import request_id_from
from deepserve.v1 import common_pb2, gateway_pb2_grpc
from deepserve.v1 import gateway_pb2 as pb

_FINISH = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
}


def _options(opts: pb.GenerationOptions, *, chat: bool) -> dict[str, Any]:
    s = opts.sampling
    fields: dict[str, Any] = {
        "n": opts.n or 1,
        "user": opts.user or None,
        "temperature": s.temperature,
        "top_p": s.top_p or None,
        "top_k": s.top_k or None,
        "min_p": s.min_p or None,
        "seed": s.seed if s.HasField("seed") else None,
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
        "repetition_penalty": s.repetition_penalty or None,
        "stop": list(s.stop) or None,
        "stop_token_ids": list(s.stop_token_ids) or None,
        "max_tokens": s.max_tokens or None,
        "min_tokens": s.min_tokens or None,
        "ignore_eos": s.ignore_eos,
        "skip_special_tokens": not s.keep_special_tokens,
    }
    if chat:
        fields["logprobs"] = s.logprobs
        fields["top_logprobs"] = s.top_logprobs or None
    else:
        fields["logprobs"] = s.top_logprobs if s.logprobs else None
    return fields


def _validate(model: type[BaseModel], fields: dict[str, Any]) -> Any:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        raise InvalidArgument(first["msg"], field=field) from None


def chat_body(params: pb.ChatCompletionParams, stream: bool) -> ChatCompletionRequest:
    fields = _options(params.options, chat=True)
    fields["model"] = params.model
    fields["stream"] = stream
    fields["messages"] = [
        {"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})}
        for m in params.messages
    ]
    return _validate(ChatCompletionRequest, fields)


def completion_body(params: pb.CompletionParams, stream: bool) -> CompletionRequest:
    fields = _options(params.options, chat=False)
    fields["model"] = params.model
    fields["stream"] = stream
    fields["prompt"] = params.prompt
    fields["echo"] = params.echo
    if not params.options.sampling.max_tokens:
        fields.pop("max_tokens")  # the completions default (16) applies
    return _validate(CompletionRequest, fields)


def _usage(usage: CallUsage) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        cached_tokens=usage.cached_tokens,
    )


class _ChoiceBuilder:
    """Builds proto choices, decoding logprob token strings with the model's tokenizer."""

    def __init__(self, call: ApiCall) -> None:
        self._call = call
        self._echoed: set[int] = set()

    def _text(self, index: int, text: str) -> str:
        job = self._call.job
        if job.echo and index not in self._echoed:
            self._echoed.add(index)
            return job.prompts[index // job.n].text + text
        return text

    def choice(self, index: int, text: str, deltas: list[ChoiceDelta]) -> pb.Choice:
        choice = pb.Choice(index=index, text=self._text(index, text))
        tokenizer = self._call.tokenizer
        top_n = self._call.job.top_logprobs
        for delta in deltas:
            if delta.finish_reason is not None:
                choice.finish_reason = _FINISH.get(
                    delta.finish_reason, common_pb2.FINISH_REASON_STOP
                )
            for entry in delta.logprobs:
                out = choice.logprobs.add()
                out.chosen.CopyFrom(entry.chosen)
                out.chosen.token = tokenizer.decode([entry.chosen.token_id])
                for top in entry.top[:top_n]:
                    alt = out.top.add()
                    alt.CopyFrom(top)
                    alt.token = tokenizer.decode([top.token_id])
        return choice


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def _open(
        self, body: ChatCompletionRequest | CompletionRequest, context: grpc.aio.ServicerContext
    ) -> ApiCall:
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        request_id = request_id_from(metadata.get("x-request-id"))
        await context.send_initial_metadata((("x-request-id", request_id),))
        caller = self._gateway.authenticate(metadata.get("authorization"))
        return await self._gateway.open_call(body, caller, request_id)

    async def _unary(self, call: ApiCall) -> tuple[list[pb.Choice], common_pb2.Usage]:
        async with call:
            per_choice: list[list[ChoiceDelta]] = [[] for _ in range(call.job.fanout)]
            async for delta in call:
                per_choice[delta.index].append(delta)
        builder = _ChoiceBuilder(call)
        choices = [
            builder.choice(i, "".join(d.text for d in deltas), deltas)
            for i, deltas in enumerate(per_choice)
        ]
        return choices, _usage(call.usage())

    async def _stream(self, call: ApiCall) -> AsyncIterator[tuple[list[pb.Choice], Any]]:
        builder = _ChoiceBuilder(call)
        async with call:
            async for delta in call:
                yield [builder.choice(delta.index, delta.text, [delta])], None
        yield [], _usage(call.usage())

    async def CreateChatCompletion(
        self, request: pb.CreateChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateChatCompletionResponse:
        call = await self._open(chat_body(request.params, False), context)
        choices, usage = await self._unary(call)
        return pb.CreateChatCompletionResponse(
            id=f"chatcmpl-{call.job.request_id}",
            model=call.job.model,
            created_unix=call.job.created,
            choices=choices,
            usage=usage,
        )

    async def StreamChatCompletion(
        self, request: pb.StreamChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamChatCompletionResponse]:
        call = await self._open(chat_body(request.params, True), context)
        async for choices, usage in self._stream(call):
            yield pb.StreamChatCompletionResponse(
                id=f"chatcmpl-{call.job.request_id}",
                model=call.job.model,
                choices=choices,
                usage=usage,
            )

    async def CreateCompletion(
        self, request: pb.CreateCompletionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateCompletionResponse:
        call = await self._open(completion_body(request.params, False), context)
        choices, usage = await self._unary(call)
        return pb.CreateCompletionResponse(
            id=f"cmpl-{call.job.request_id}",
            model=call.job.model,
            created_unix=call.job.created,
            choices=choices,
            usage=usage,
        )

    async def StreamCompletion(
        self, request: pb.StreamCompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamCompletionResponse]:
        call = await self._open(completion_body(request.params, True), context)
        async for choices, usage in self._stream(call):
            yield pb.StreamCompletionResponse(
                id=f"cmpl-{call.job.request_id}",
                model=call.job.model,
                choices=choices,
                usage=usage,
            )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        self._gateway.authenticate(metadata.get("authorization"))
        return pb.ListModelsResponse(
            models=[
                pb.ModelCard(
                    id=c.model_id,
                    owned_by=c.owned_by,
                    created_unix=c.created_at,
                    instances=c.instances,
                )
                for c in self._gateway.models.list()
            ]
        )
