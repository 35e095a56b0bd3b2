"""OpenAI response bodies: whole responses, SSE chunks, usage and logprobs objects.

Token strings in logprobs are decoded here with the model's tokenizer (the engine sends ids and
raw vocabulary entries); everything else comes straight from the engine's deltas. With tools,
each chat choice's text runs through the model's tool-call parser: calls become
`message.tool_calls` (streamed as tool-call deltas in OpenAI's chunk shape) and the choice
finishes with "tool_calls"; text that does not parse as a call stays content.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from deepserve.completions.call import ApiCall, CallUsage
from deepserve.completions.dispatcher import ChoiceDelta
from deepserve.completions.tool_parsers import StreamEvents, ToolCall, ToolCallStreamer
from deepserve.tokenizer import Tokenizer
from deepserve.v1 import common_pb2


def usage_json(usage: CallUsage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


class _TokenText:
    """Decodes single token ids, memoized (logprobs repeat the same ids a lot)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._tokenizer.decode([token_id])
        return text


@dataclass(slots=True)
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: list[common_pb2.TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None


class ResponseFormatter:
    """Builds the JSON of one call's response (whole or chunked) for its endpoint."""

    def __init__(self, call: ApiCall) -> None:
        self.call = call
        self.job = call.job
        self.chat = call.job.endpoint == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + call.job.request_id
        self._token_text = _TokenText(call.tokenizer)
        # Completions: where the next token's text starts, per choice (text_offset).
        self._offsets = [
            len(self.job.prompts[i // self.job.n].text) if self.job.echo else 0
            for i in range(self.job.fanout)
        ]
        self._echoed: set[int] = set()
        tools = call.job.tools
        # One tool-call streamer per chat choice when the model was offered tools.
        self._streamers: list[ToolCallStreamer] | None = (
            [tools.streamer() for _ in range(self.job.fanout)]
            if self.chat and tools is not None and tools.mode != "none"
            else None
        )

    # --- tool calls ----------------------------------------------------------------------

    def _tool_events(self, index: int, text: str, finished: bool) -> StreamEvents | None:
        if self._streamers is None:
            return None
        streamer = self._streamers[index]
        events = streamer.feed(text)
        if finished:
            tail = streamer.finish()
            events.content += tail.content
            events.calls.extend(tail.calls)
        return events

    def _finish_reason(self, index: int, reason: str | None) -> str | None:
        if reason == "stop" and self._streamers is not None and self._streamers[index].calls:
            return "tool_calls"
        return reason

    # --- logprobs ------------------------------------------------------------------------

    def _chat_logprobs(self, entries: Sequence[common_pb2.TokenLogprobs]) -> dict[str, Any]:
        content = []
        for entry in entries:
            token = self._token_text(entry.chosen.token_id)
            content.append(
                {
                    "token": token,
                    "logprob": entry.chosen.logprob,
                    "bytes": list(token.encode("utf-8")),
                    "top_logprobs": [
                        {
                            "token": (alt := self._token_text(top.token_id)),
                            "logprob": top.logprob,
                            "bytes": list(alt.encode("utf-8")),
                        }
                        for top in entry.top[: self.job.top_logprobs]
                    ],
                }
            )
        return {"content": content}

    def _text_logprobs(self, index: int, entries: Sequence[common_pb2.TokenLogprobs]) -> Any:
        tokens, token_logprobs, tops, offsets = [], [], [], []
        for entry in entries:
            token = self._token_text(entry.chosen.token_id)
            tokens.append(token)
            token_logprobs.append(entry.chosen.logprob)
            tops.append(
                {
                    self._token_text(top.token_id): top.logprob
                    for top in entry.top[: self.job.top_logprobs]
                }
            )
            offsets.append(self._offsets[index])
            self._offsets[index] += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def _logprobs(self, index: int, entries: Sequence[common_pb2.TokenLogprobs]) -> Any:
        if not self.job.sampling.logprobs:
            return None
        return self._chat_logprobs(entries) if self.chat else self._text_logprobs(index, entries)

    def _echo(self, index: int, text: str) -> str:
        if self.job.echo and index not in self._echoed:
            self._echoed.add(index)
            return self.job.prompts[index // self.job.n].text + text
        return text

    # --- streaming -----------------------------------------------------------------------

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.job.created,
            "model": self.job.response_model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.job.include_usage:
            chunk["usage"] = None
        return chunk

    def role_chunk(self) -> dict[str, Any] | None:
        """Chat streams open with the assistant role for every choice, as OpenAI's do."""
        if not self.chat:
            return None
        return self._envelope(
            [
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                for i in range(self.job.fanout)
            ]
        )

    def chunk(self, delta: ChoiceDelta) -> dict[str, Any] | None:
        """The chunk for one delta, or None when it carries nothing to show."""
        if not delta.text and delta.finish_reason is None and not delta.logprobs:
            return None
        choice: dict[str, Any] = {"index": delta.index}
        events = self._tool_events(delta.index, delta.text, delta.finish_reason is not None)
        if events is not None:
            if not events.content and not events.calls and delta.finish_reason is None:
                if not delta.logprobs:
                    return None  # held back: may be the start of a tool call
            body: dict[str, Any] = {}
            if events.content:
                body["content"] = events.content
            if events.calls:
                first = len(self._streamers[delta.index].calls) - len(events.calls)  # type: ignore[index]
                body["tool_calls"] = [
                    {"index": first + k, **call.to_openai()} for k, call in enumerate(events.calls)
                ]
            choice["delta"] = body
        elif self.chat:
            choice["delta"] = {"content": delta.text} if delta.text else {}
        else:
            choice["text"] = self._echo(delta.index, delta.text)
        choice["logprobs"] = self._logprobs(delta.index, delta.logprobs) if delta.logprobs else None
        choice["finish_reason"] = self._finish_reason(delta.index, delta.finish_reason)
        if delta.stop_reason and not self.chat:
            choice["stop_reason"] = delta.stop_reason
        return self._envelope([choice])

    def message(self, index: int, text: str) -> dict[str, Any]:
        """A whole chat choice's message: content, and tool calls when the model made any."""
        events = self._tool_events(index, text, finished=True)
        if events is None:
            return {"role": "assistant", "content": text}
        calls: list[ToolCall] = events.calls
        content: str | None = events.content
        if calls and not (content or "").strip():
            content = None
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [call.to_openai() for call in calls]
        return message

    def usage_chunk(self) -> dict[str, Any]:
        chunk = self._envelope([])
        chunk["usage"] = usage_json(self.call.usage())
        return chunk

    # --- whole response ------------------------------------------------------------------

    def response(self, deltas: Sequence[ChoiceDelta]) -> dict[str, Any]:
        choices = [_Choice() for _ in range(self.job.fanout)]
        for delta in deltas:
            choice = choices[delta.index]
            choice.text.append(delta.text)
            choice.logprobs.extend(delta.logprobs)
            if delta.finish_reason is not None:
                choice.finish_reason = delta.finish_reason
        body_choices = []
        for index, choice in enumerate(choices):
            text = "".join(choice.text)
            logprobs = self._logprobs(index, choice.logprobs)
            if self.chat:
                message = self.message(index, text)
                body_choices.append(
                    {
                        "index": index,
                        "message": message,
                        "logprobs": logprobs,
                        "finish_reason": self._finish_reason(index, choice.finish_reason),
                    }
                )
            else:
                body_choices.append(
                    {
                        "index": index,
                        "text": self._echo(index, text),
                        "logprobs": logprobs,
                        "finish_reason": choice.finish_reason,
                    }
                )
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.job.created,
            "model": self.job.response_model,
            "system_fingerprint": None,
            "choices": body_choices,
            "usage": usage_json(self.call.usage()),
        }
