"""What every tool-call parser shares: the call type, the parser interface and the streamer.

A parser knows one model family's way of writing tool calls (the markers around them, the JSON
inside) and the grammar that forces that shape. `ToolCallStreamer` runs any parser over text
deltas: content streams through until a call starts (text that may be the start of a marker is
held back, like a stop string), a call is buffered until it is complete and then emitted whole,
and text that turns out not to be a call is released as content. Whole responses run the same
streamer over the full text, so both paths agree.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One function call the model made: `arguments` is a JSON object as text (OpenAI's shape)."""

    name: str
    arguments: str
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True, slots=True)
class FunctionTool:
    """A function the model may call: its name, description and parameters schema."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object"})
    strict: bool = False

    def to_openai(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


def call_from_json(
    value: Any, arguments_keys: Sequence[str] = ("arguments", "parameters")
) -> ToolCall | None:
    """{"name": ..., "arguments": {...}} (or "parameters") as a call; None if it is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    args: Any = {}
    for key in arguments_keys:
        if key in value:
            args = value[key]
            break
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(value["name"], json.dumps(args, ensure_ascii=False))


def json_values(text: str) -> list[Any] | None:
    """Every JSON value in `text`, separated by whitespace, commas or semicolons; None when
    anything else stands between them."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    pos, end = 0, len(text)
    while True:
        while pos < end and text[pos] in " \t\r\n,;":
            pos += 1
        if pos >= end:
            return values
        try:
            value, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return None
        values.append(value)


class ToolParser:
    """One model family's tool-call format: find calls in text, and force them by grammar."""

    name = ""
    # Text that opens tool-call output. `start_anywhere` False: only at the start of the
    # output (after whitespace), e.g. Llama's bare JSON object.
    start_markers: tuple[str, ...] = ()
    start_anywhere = True
    # Closes one call; None: a call runs to the end of the output.
    end_marker: str | None = None
    # Markers are special tokens the detokenizer would drop unless told to keep them.
    needs_special_tokens = False

    def parse_block(self, block: str) -> list[ToolCall] | None:
        """The calls in one block of call text (markers included); None if it is not calls."""
        raise NotImplementedError

    def forced_grammar(self, tools: Sequence[FunctionTool], parallel: bool) -> str:
        """A Lark grammar (llguidance's dialect) whose every sentence is a valid call, or with
        `parallel` one or more, of `tools`, each matching its parameters schema."""
        raise NotImplementedError


def call_schema(tools: Sequence[FunctionTool], arguments_key: str = "arguments") -> dict[str, Any]:
    """A JSON schema of one call object: a tool's name and arguments that match its schema."""
    branches = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, arguments_key: t.parameters},
            "required": ["name", arguments_key],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema: dict[str, Any] = branches[0] if len(branches) == 1 else {"anyOf": branches}
    # No free whitespace inside the call's JSON (llguidance's per-schema options).
    return {
        **schema,
        "x-guidance": {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"},
    }


def lark_json(schema: dict[str, Any]) -> str:
    return "%json " + json.dumps(schema, ensure_ascii=False)


def lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


@dataclass(slots=True)
class StreamEvents:
    """What one feed of text produced: content to show, and calls completed."""

    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)


class ToolCallStreamer:
    """Splits a model's streamed text into content and tool calls with one parser.

    `forced`: the output is calls only (tool_choice required or a named function), so it starts
    in a call. `parallel` False keeps only the first call.
    """

    def __init__(self, parser: ToolParser, *, forced: bool = False, parallel: bool = True) -> None:
        self.parser = parser
        self.parallel = parallel
        self._pending = ""
        self._in_call = forced
        self._forced = forced
        self._emitted_content = False
        # Whitespace after a call, held until text follows it (then it is content) or a call
        # or the end does (then it is dropped), so chunking never changes the content.
        self._held_space = ""
        self.calls: list[ToolCall] = []

    def feed(self, delta: str) -> StreamEvents:
        self._pending += delta
        events = StreamEvents()
        while self._pending:
            if not self._in_call:
                start = self._find_start()
                if start is None:
                    keep = self._partial_marker_len()
                    self._emit_content(events, self._pending[: len(self._pending) - keep])
                    self._pending = self._pending[len(self._pending) - keep :]
                    break
                before = self._pending[:start]
                if before.strip():
                    self._emit_content(events, before)
                self._held_space = ""  # whitespace that only leads into a call is not content
                self._pending = self._pending[start:]
                self._in_call = True
            end_marker = self.parser.end_marker
            if end_marker is None:
                break  # the call runs to the end: parsed by finish()
            end = self._pending.find(end_marker)
            if end < 0:
                break
            block = self._pending[: end + len(end_marker)]
            self._pending = self._pending[end + len(end_marker) :]
            self._in_call = self._forced and bool(self._pending.strip())
            self._take_block(events, block)
        return events

    def finish(self) -> StreamEvents:
        """End of output: a call still open is parsed (or released as content)."""
        events = StreamEvents()
        rest, self._pending = self._pending, ""
        if self._in_call and rest.strip():
            self._take_block(events, rest)
        else:
            self._emit_content(events, rest)
        return events

    def _take_block(self, events: StreamEvents, block: str) -> None:
        calls = self.parser.parse_block(block)
        if calls is None or not calls:
            self._emit_content(events, block)  # not a call after all: auto returns it as text
            return
        if not self.parallel:
            calls = calls[: max(0, 1 - len(self.calls))]
        self.calls.extend(calls)
        events.calls.extend(calls)

    def _emit_content(self, events: StreamEvents, text: str) -> None:
        if not text:
            return
        if self.calls and not text.strip():
            self._held_space += text
            return
        text, self._held_space = self._held_space + text, ""
        events.content += text
        self._emitted_content = self._emitted_content or bool(text.strip())

    def _find_start(self) -> int | None:
        best: int | None = None
        for marker in self.parser.start_markers:
            if self.parser.start_anywhere:
                at = self._pending.find(marker)
            else:
                stripped = self._pending.lstrip()
                at = (
                    len(self._pending) - len(stripped)
                    if not self._emitted_content and not self.calls and stripped.startswith(marker)
                    else -1
                )
            if at >= 0 and (best is None or at < best):
                best = at
        return best

    def _partial_marker_len(self) -> int:
        """Length of the tail of pending text that could still become a start marker."""
        if not self.parser.start_anywhere:
            if self._emitted_content or self.calls:
                return 0
            stripped = self._pending.lstrip()
            if not stripped or any(m.startswith(stripped) for m in self.parser.start_markers):
                return len(self._pending)
            return 0
        longest = 0
        for marker in self.parser.start_markers:
            for length in range(min(len(marker) - 1, len(self._pending)), 0, -1):
                if marker.startswith(self._pending[-length:]):
                    longest = max(longest, length)
                    break
        return longest
