"""Mistral tool calls: `[TOOL_CALLS]` then a JSON list of `{"name": ..., "arguments": {...}}`
(v0.3 templates), or `[TOOL_CALLS]name[ARGS]{...}` (the newer tokenizers)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from deepserve.completions.tool_parsers.base import (
    FunctionTool,
    ToolCall,
    ToolParser,
    call_from_json,
    call_schema,
    json_values,
    lark_json,
)

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"


class MistralToolParser(ToolParser):
    """`[TOOL_CALLS]` followed by the calls, to the end of the output."""

    name = "mistral"
    start_markers = (TOOL_CALLS,)
    end_marker = None
    needs_special_tokens = True

    def parse_block(self, block: str) -> list[ToolCall] | None:
        text = block.strip()
        if text.startswith(TOOL_CALLS):
            text = text[len(TOOL_CALLS) :].strip()
        if ARGS in text and not text.startswith("["):
            return self._parse_named(text)
        values = json_values(text)
        if not values:
            return None
        flat = [v for value in values for v in (value if isinstance(value, list) else [value])]
        calls = [call_from_json(v) for v in flat]
        if not calls or any(c is None for c in calls):
            return None
        return [c for c in calls if c is not None]

    @staticmethod
    def _parse_named(text: str) -> list[ToolCall] | None:
        calls: list[ToolCall] = []
        for part in text.split(TOOL_CALLS):
            name, sep, args = part.partition(ARGS)
            if not sep or not name.strip():
                return None
            call = call_from_json({"name": name.strip(), "arguments": args.strip()})
            if call is None:
                return None
            calls.append(call)
        return calls

    def forced_grammar(self, tools: Sequence[FunctionTool], parallel: bool) -> str:
        schema = {"type": "array", "items": call_schema(tools), "minItems": 1}
        if not parallel:
            schema["maxItems"] = 1
        schema["x-guidance"] = {
            "whitespace_flexible": False,
            "item_separator": ",",
            "key_separator": ":",
        }
        return "\n".join([f"start: {json.dumps(TOOL_CALLS)} calls", f"calls: {lark_json(schema)}"])
