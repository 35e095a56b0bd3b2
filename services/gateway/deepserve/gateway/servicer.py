"""GatewayService: the gRPC face of the gateway, over the same request path as HTTP.

Wire messages become the OpenAI request models, so validation, limits and accounting are the
HTTP API's. Proto3 cannot tell an unset field from a zero, so zeros mean "the default" except
where zero is meaningful (temperature 0 is greedy, as the SamplingParams proto documents).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
from pydantic import BaseModel, ValidationError

from deepserve.completions.call import ApiCall, CallUsage
from deepserve.completions.context_store import CachedContextRecord
from deepserve.completions.dispatcher import ChoiceDelta
from deepserve.completions.protocol import ChatCompletionRequest, CompletionRequest
from deepserve.completions.response_format import ResponseFormatter
from deepserve.completions.responses import ResponsesRequest
from deepserve.errors import FailedPrecondition, InvalidArgument
from deepserve.gateway.auth import Caller
from deepserve.gateway.cached_contexts import CachedContextRequest
from deepserve.gateway.gateway import Gateway
from deepserve.gateway.request_ids import request_id_from
from deepserve.v1 import common_pb2, gateway_pb2_grpc
from deepserve.v1 import gateway_pb2 as pb
from deepserve.wire import structured_output_from_proto

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
    guided = structured_output_from_proto(opts.guided)
    if guided is not None:
        name = {
            "json_schema": "guided_json",
            "json_object": "guided_json",
            "regex": "guided_regex",
            "choice": "guided_choice",
            "grammar": "guided_grammar",
            "lark": "guided_grammar",
        }[guided.kind]
        value: Any = guided.spec
        if guided.kind == "choice":
            value = _json_field(guided.spec, "options.guided.spec")
        elif guided.kind == "json_object":
            value = {"type": "object"}
        fields[name] = value
    fields["cached_context_id"] = opts.cached_context_id or None
    fields["cache_salt"] = opts.cache_salt or None
    return fields


def _json_field(text: str, field: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"is not JSON: {exc}", field=field) from None


def _tools(tools: Any) -> list[dict[str, Any]] | None:
    out = []
    for i, tool in enumerate(tools):
        function: dict[str, Any] = {"name": tool.name, "description": tool.description}
        if tool.parameters_json:
            function["parameters"] = _json_field(
                tool.parameters_json, f"tools[{i}].parameters_json"
            )
        if tool.strict:
            function["strict"] = True
        out.append({"type": "function", "function": function})
    return out or None


def _tool_choice(choice: pb.ToolChoice) -> Any:
    which = choice.WhichOneof("choice")
    if which == "mode":
        return choice.mode
    if which == "function_name":
        return {"type": "function", "function": {"name": choice.function_name}}
    return None


def _response_format(fmt: pb.ResponseFormat, field: str) -> dict[str, Any] | None:
    if not fmt.type:
        return None
    if fmt.type != "json_schema":
        return {"type": fmt.type}
    spec: dict[str, Any] = {"schema": _json_field(fmt.json_schema, f"{field}.json_schema")}
    if fmt.name:
        spec["name"] = fmt.name
    if fmt.strict:
        spec["strict"] = True
    return {"type": "json_schema", "json_schema": spec}


def _message(m: pb.ChatMessage) -> dict[str, Any]:
    message: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.name:
        message["name"] = m.name
    if m.tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in m.tool_calls
        ]
        message["content"] = m.content or None
    if m.tool_call_id:
        message["tool_call_id"] = m.tool_call_id
    return message


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
    fields["messages"] = [_message(m) for m in params.messages]
    fields["tools"] = _tools(params.tools)
    fields["tool_choice"] = _tool_choice(params.tool_choice)
    if params.HasField("parallel_tool_calls"):
        fields["parallel_tool_calls"] = params.parallel_tool_calls
    fields["response_format"] = _response_format(params.response_format, "response_format")
    return _validate(ChatCompletionRequest, fields)


def responses_body(params: pb.ResponseParams, stream: bool) -> ResponsesRequest:
    fields: dict[str, Any] = {
        "model": params.model,
        "stream": stream,
        "instructions": params.instructions or None,
        "max_output_tokens": params.max_output_tokens or None,
        "previous_response_id": params.previous_response_id or None,
        "tools": [{"type": "function", **t["function"]} for t in (_tools(params.tools) or [])]
        or None,
        "tool_choice": _tool_choice(params.tool_choice),
        "cached_context_id": params.cached_context_id or None,
        "cache_salt": params.cache_salt or None,
    }
    if params.input:
        fields["input"] = [
            {k: v for k, v in item.items() if v}
            for item in (
                {
                    "type": i.type or "message",
                    "role": i.role,
                    "content": i.content,
                    "call_id": i.call_id,
                    "name": i.name,
                    "arguments": i.arguments,
                    "output": i.output,
                }
                for i in params.input
            )
        ]
    else:
        fields["input"] = params.input_text
    for name in ("parallel_tool_calls", "temperature", "top_p", "store"):
        if params.HasField(name):
            fields[name] = getattr(params, name)
    fmt = _response_format(params.text_format, "text_format")
    if fmt is not None:
        flat = fmt.get("json_schema", {})
        fields["text"] = {"format": {"type": fmt["type"], **flat}}
    return _validate(ResponsesRequest, fields)


def response_to_proto(body: dict[str, Any]) -> pb.ResponseObject:
    usage = body.get("usage") or {}
    out = pb.ResponseObject(
        id=body["id"],
        model=body["model"],
        status=body["status"],
        created_unix=body["created_at"],
        previous_response_id=body.get("previous_response_id") or "",
        incomplete_reason=(body.get("incomplete_details") or {}).get("reason", ""),
        usage=common_pb2.Usage(
            prompt_tokens=usage.get("input_tokens", 0),
            completion_tokens=usage.get("output_tokens", 0),
            total_tokens=usage.get("total_tokens", 0),
            cached_tokens=usage.get("input_tokens_details", {}).get("cached_tokens", 0),
        ),
    )
    texts = []
    for item in body.get("output", []):
        out.output.append(item_to_proto(item))
        texts.extend(p["text"] for p in item.get("content", []) if p.get("type") == "output_text")
    out.output_text = "".join(texts)
    return out


def item_to_proto(item: dict[str, Any]) -> pb.ResponseOutputItem:
    text = "".join(p.get("text", "") for p in item.get("content", []))
    return pb.ResponseOutputItem(
        type=item["type"],
        id=item.get("id", ""),
        status=item.get("status", ""),
        role=item.get("role", ""),
        text=text,
        call_id=item.get("call_id", ""),
        name=item.get("name", ""),
        arguments=item.get("arguments", ""),
    )


def context_to_proto(record: CachedContextRecord) -> pb.CachedContext:
    return pb.CachedContext(
        id=record.context_id,
        model=record.model,
        tokens=len(record.token_ids),
        pinned_tokens=record.pinned_tokens,
        created_unix=record.created_at,
        expires_unix=record.expires_at,
        ttl_seconds=record.ttl_seconds,
    )


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

    def __init__(self, call: ApiCall, whole: bool = True) -> None:
        self._call = call
        self._echoed: set[int] = set()
        # Chat with tools: calls are parsed out of the text as over HTTP.
        self._tools = ResponseFormatter(call) if call.job.tools is not None else None
        self._whole = whole

    def _text(self, index: int, text: str) -> str:
        job = self._call.job
        if job.echo and index not in self._echoed:
            self._echoed.add(index)
            return job.prompts[index // job.n].text + text
        return text

    def choice(self, index: int, text: str, deltas: list[ChoiceDelta]) -> pb.Choice:
        choice = pb.Choice(index=index, text=self._text(index, text))
        if self._tools is not None:
            if self._whole:
                message = self._tools.message(index, text)
                calls = message.get("tool_calls", [])
                choice.text = message.get("content") or ""
            else:
                last = deltas[-1] if deltas else ChoiceDelta(index, text, [])
                chunk = self._tools.chunk(
                    ChoiceDelta(index, text, [], finish_reason=last.finish_reason)
                )
                body = chunk["choices"][0]["delta"] if chunk else {}
                calls = body.get("tool_calls", [])
                choice.text = body.get("content", "")
            for call in calls:
                choice.tool_calls.add(
                    id=call["id"],
                    name=call["function"]["name"],
                    arguments=call["function"]["arguments"],
                )
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

    async def _caller(self, context: grpc.aio.ServicerContext) -> tuple[Caller, str]:
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        request_id = request_id_from(metadata.get("x-request-id"))
        await context.send_initial_metadata((("x-request-id", request_id),))
        return self._gateway.authenticate(metadata.get("authorization")), request_id

    async def _open(
        self, body: ChatCompletionRequest | CompletionRequest, context: grpc.aio.ServicerContext
    ) -> ApiCall:
        caller, request_id = await self._caller(context)
        return await self._gateway.open_call(body, caller, request_id)

    def _responses(self) -> Any:
        if self._gateway.responses is None or self._gateway.contexts is None:
            raise FailedPrecondition("this gateway has no conversation store")
        return self._gateway.responses

    async def CreateResponse(
        self, request: pb.CreateResponseRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateResponseResponse:
        caller, request_id = await self._caller(context)
        service = self._responses()
        turn = await service.open_turn(responses_body(request.params, False), caller, request_id)
        try:
            body = await service.collect(turn)
        finally:
            await turn.call.close()
        return pb.CreateResponseResponse(response=response_to_proto(body))

    async def StreamResponse(
        self, request: pb.StreamResponseRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponseResponse]:
        caller, request_id = await self._caller(context)
        service = self._responses()
        turn = await service.open_turn(responses_body(request.params, True), caller, request_id)
        try:
            async for event in service.stream(turn):
                reply = pb.StreamResponseResponse(
                    type=event["type"],
                    sequence_number=event["sequence_number"],
                    output_index=event.get("output_index", 0),
                    item_id=event.get("item_id", ""),
                    delta=event.get("delta", ""),
                )
                if "item" in event:
                    reply.item.CopyFrom(item_to_proto(event["item"]))
                if "response" in event:
                    reply.response.CopyFrom(response_to_proto(event["response"]))
                yield reply
        finally:
            await turn.call.close()

    async def GetResponse(
        self, request: pb.GetResponseRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetResponseResponse:
        caller, _ = await self._caller(context)
        body = await self._responses().get(caller.tenant, request.response_id)
        return pb.GetResponseResponse(response=response_to_proto(body))

    async def DeleteResponse(
        self, request: pb.DeleteResponseRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteResponseResponse:
        caller, _ = await self._caller(context)
        await self._responses().delete(caller.tenant, request.response_id)
        return pb.DeleteResponseResponse(deleted=True)

    def _contexts(self) -> Any:
        if self._gateway.contexts is None:
            raise FailedPrecondition("this gateway has no cached-context store")
        return self._gateway.contexts

    async def CreateCachedContext(
        self, request: pb.CreateCachedContextRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateCachedContextResponse:
        caller, _ = await self._caller(context)
        fields: dict[str, Any] = {
            "model": request.model,
            "ttl_seconds": request.ttl_seconds or None,
            "cache_salt": request.cache_salt or None,
        }
        if request.messages:
            fields["messages"] = [_message(m) for m in request.messages]
        if request.prompt:
            fields["prompt"] = request.prompt
        body = _validate(CachedContextRequest, fields)
        record = await self._contexts().create(body, caller)
        return pb.CreateCachedContextResponse(context=context_to_proto(record))

    async def GetCachedContext(
        self, request: pb.GetCachedContextRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetCachedContextResponse:
        caller, _ = await self._caller(context)
        record = await self._contexts().store.get(
            caller.tenant, request.context_id, field="context_id"
        )
        return pb.GetCachedContextResponse(context=context_to_proto(record))

    async def ListCachedContexts(
        self, request: pb.ListCachedContextsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListCachedContextsResponse:
        caller, _ = await self._caller(context)
        found = await self._contexts().store.list(caller.tenant)
        return pb.ListCachedContextsResponse(contexts=[context_to_proto(r) for r in found])

    async def DeleteCachedContext(
        self, request: pb.DeleteCachedContextRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteCachedContextResponse:
        caller, _ = await self._caller(context)
        await self._contexts().delete(caller.tenant, request.context_id)
        return pb.DeleteCachedContextResponse(deleted=True)

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
        builder = _ChoiceBuilder(call, whole=False)
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
        caller = self._gateway.authenticate(metadata.get("authorization"))
        return pb.ListModelsResponse(
            models=[
                pb.ModelCard(
                    id=c.model_id,
                    owned_by=c.owned_by,
                    created_unix=c.created_at,
                    instances=c.instances,
                )
                for c in self._gateway.models.list(caller.tenant)
            ]
        )
