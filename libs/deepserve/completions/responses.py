"""The OpenAI Responses API over the chat path: request, input items, output items and events.

A Responses request becomes a chat request: `instructions` as the system message, then the
stored conversation of `previous_response_id` (if any), then the turn's `input` items (text,
messages, function calls and their outputs), with function tools, `tool_choice` and `text.format`
carried over. The chat path's deltas come back as output items (a message with output_text, and
function_call items parsed by the model's tool-call parser) and, streaming, as OpenAI's event
sequence: response.created, response.in_progress, response.output_item.added,
response.content_part.added, response.output_text.delta ... done, response.function_call_arguments.
delta/done, response.output_item.done, response.completed (or response.incomplete).

Re-rendering the conversation each turn keeps the earlier turns' prompt as the token prefix of
the next one (chat templates render a conversation as its messages in order), so a later turn
is routed to the instance caching that prefix and reuses its KV.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from deepserve.completions.call import CallUsage
from deepserve.completions.protocol import ChatCompletionRequest
from deepserve.completions.structured import response_format_constraint
from deepserve.completions.tool_parsers import ToolCall, ToolCallStreamer
from deepserve.errors import InvalidArgument


class ResponsesRequest(BaseModel):
    """POST /v1/responses (unknown fields are ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1)]
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    text: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    cache_salt: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    cached_context_id: str | None = None


def new_response_id() -> str:
    return "resp_" + uuid.uuid4().hex


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _text_of(content: Any, field: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in (
                "input_text",
                "output_text",
                "text",
            ):
                raise InvalidArgument(
                    "only text content parts are supported", field=f"{field}[{j}]"
                )
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise InvalidArgument("must be a string or a list of content parts", field=field)


def input_messages(raw: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The turn's input items as chat messages (function calls and outputs included)."""
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if not raw:
        raise InvalidArgument("must not be empty", field="input")
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidArgument("must be an object", field=where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise InvalidArgument(
                    "must be user, assistant, system or developer", field=f"{where}.role"
                )
            messages.append(
                {
                    "role": "system" if role == "developer" else role,
                    "content": _text_of(item.get("content", ""), f"{where}.content"),
                }
            )
        elif kind == "function_call":
            name, call_id = item.get("name"), item.get("call_id")
            if not isinstance(name, str) or not isinstance(call_id, str):
                raise InvalidArgument("needs a name and a call_id", field=where)
            call = {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": str(item.get("arguments", "{}"))},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise InvalidArgument("needs a call_id", field=f"{where}.call_id")
            output = item.get("output", "")
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": call_id,
                    "content": output if isinstance(output, str) else json.dumps(output),
                }
            )
        else:
            raise InvalidArgument(
                "must be a message, function_call or function_call_output", field=f"{where}.type"
            )
    return messages


def _chat_response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """`text.format` (flat) checked and rewritten as chat's `response_format`."""
    if not text or text.get("format") is None:
        return None
    fmt = text["format"]
    response_format_constraint(fmt, field="text.format")  # names the Responses field
    if fmt.get("type") != "json_schema":
        return dict(fmt)
    spec = {k: v for k, v in fmt.items() if k != "type"}
    return {"type": "json_schema", "json_schema": spec}


def chat_request(req: ResponsesRequest, history: Sequence[dict[str, Any]]) -> ChatCompletionRequest:
    """The chat request a Responses turn runs as."""
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    messages.extend(history)
    messages.extend(input_messages(req.input))
    fields: dict[str, Any] = {
        "model": req.model,
        "messages": messages,
        "max_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "seed": req.seed,
        "tools": req.tools,
        "tool_choice": req.tool_choice,
        "parallel_tool_calls": req.parallel_tool_calls,
        "response_format": _chat_response_format(req.text),
        "user": req.user,
        "cache_salt": req.cache_salt,
        "cached_context_id": req.cached_context_id,
        "stream": req.stream,
    }
    return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})


def usage_object(usage: CallUsage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": [] if status == "in_progress" else [_text_part(text)],
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def function_call_item(item_id: str, call: ToolCall, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments if status == "completed" else "",
        "status": status,
    }


@dataclass(slots=True)
class TurnResult:
    """What one turn produced: output items, the assistant message for the conversation."""

    items: list[dict[str, Any]] = field(default_factory=list)
    text: str = ""
    calls: list[ToolCall] = field(default_factory=list)

    def assistant_message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.text or None}
        if self.calls:
            message["tool_calls"] = [c.to_openai() for c in self.calls]
        return message


def response_object(
    req: ResponsesRequest,
    response_id: str,
    *,
    created_at: float,
    status: str,
    output: list[dict[str, Any]],
    usage: CallUsage | None,
    incomplete_reason: str | None = None,
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(created_at),
        "status": status,
        "error": None,
        "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "model": req.model,
        "output": output,
        "parallel_tool_calls": True if req.parallel_tool_calls is None else req.parallel_tool_calls,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": None, "summary": None},
        "store": req.store,
        "temperature": req.temperature,
        "text": req.text or {"format": {"type": "text"}},
        "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
        "tools": req.tools or [],
        "top_p": req.top_p,
        "truncation": "disabled",
        "usage": usage_object(usage) if usage is not None else None,
        "user": req.user,
        "metadata": req.metadata or {},
    }


class ResponseEvents:
    """Turns one choice's text deltas into Responses output items and streaming events."""

    def __init__(self, streamer: ToolCallStreamer | None) -> None:
        self._streamer = streamer
        self._sequence = 0
        self.result = TurnResult()
        self._message_id: str | None = None
        self._message_index = -1
        self._message_text: list[str] = []

    def event(self, kind: str, **body: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._sequence, **body}
        self._sequence += 1
        return event

    def feed(self, text: str, finished: bool) -> list[dict[str, Any]]:
        if self._streamer is None:
            content, calls = text, []
        else:
            events = self._streamer.feed(text)
            if finished:
                tail = self._streamer.finish()
                events.content += tail.content
                events.calls.extend(tail.calls)
            content, calls = events.content, events.calls
        out: list[dict[str, Any]] = []
        if content:
            out.extend(self._text(content))
        for call in calls:
            out.extend(self._close_message())
            out.extend(self._call(call))
        if finished:
            out.extend(self._close_message())
        return out

    def _text(self, delta: str) -> list[dict[str, Any]]:
        out = []
        if self._message_id is None:
            self._message_id = _item_id("msg")
            self._message_index = len(self.result.items)
            self.result.items.append(message_item(self._message_id, "", "in_progress"))
            out.append(
                self.event(
                    "response.output_item.added",
                    output_index=self._message_index,
                    item=message_item(self._message_id, "", "in_progress"),
                )
            )
            out.append(
                self.event(
                    "response.content_part.added",
                    item_id=self._message_id,
                    output_index=self._message_index,
                    content_index=0,
                    part=_text_part(""),
                )
            )
        self._message_text.append(delta)
        out.append(
            self.event(
                "response.output_text.delta",
                item_id=self._message_id,
                output_index=self._message_index,
                content_index=0,
                delta=delta,
                logprobs=[],
            )
        )
        return out

    def _close_message(self) -> list[dict[str, Any]]:
        if self._message_id is None:
            return []
        text = "".join(self._message_text)
        item_id, index = self._message_id, self._message_index
        self._message_id, self._message_text = None, []
        if self.result.calls and not text.strip():
            self.result.items.pop(index)  # whitespace around calls is no message
            return []
        self.result.text += text
        item = message_item(item_id, text)
        self.result.items[index] = item
        return [
            self.event(
                "response.output_text.done",
                item_id=item_id,
                output_index=index,
                content_index=0,
                text=text,
                logprobs=[],
            ),
            self.event(
                "response.content_part.done",
                item_id=item_id,
                output_index=index,
                content_index=0,
                part=_text_part(text),
            ),
            self.event("response.output_item.done", output_index=index, item=item),
        ]

    def _call(self, call: ToolCall) -> list[dict[str, Any]]:
        item_id = _item_id("fc")
        index = len(self.result.items)
        item = function_call_item(item_id, call)
        self.result.items.append(item)
        self.result.calls.append(call)
        return [
            self.event(
                "response.output_item.added",
                output_index=index,
                item=function_call_item(item_id, call, "in_progress"),
            ),
            self.event(
                "response.function_call_arguments.delta",
                item_id=item_id,
                output_index=index,
                delta=call.arguments,
            ),
            self.event(
                "response.function_call_arguments.done",
                item_id=item_id,
                output_index=index,
                name=call.name,
                arguments=call.arguments,
            ),
            self.event("response.output_item.done", output_index=index, item=item),
        ]


def turn_status(finish_reason: str | None) -> tuple[str, str | None]:
    """The response's status (and incomplete reason) for how its choice finished."""
    if finish_reason == "length":
        return "incomplete", "max_output_tokens"
    return "completed", None


def now() -> float:
    return time.time()
