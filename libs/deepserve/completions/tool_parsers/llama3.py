"""Llama 3.x JSON tool calls: `{"name": ..., "parameters": {...}}`, several separated by `;`,
optionally after `<|python_tag|>`. A call is only recognised at the start of the output."""

from __future__ import annotations

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

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    """The JSON-based tool calling of Llama 3.1/3.2/3.3 chat templates."""

    name = "llama3_json"
    start_markers = (PYTHON_TAG, "{")
    start_anywhere = False
    end_marker = None
    needs_special_tokens = True

    def parse_block(self, block: str) -> list[ToolCall] | None:
        text = block.strip()
        if text.startswith(PYTHON_TAG):
            text = text[len(PYTHON_TAG) :]
        values = json_values(text)
        if not values:
            return None
        calls = [call_from_json(v, ("parameters", "arguments")) for v in values]
        if any(c is None for c in calls):
            return None
        return [c for c in calls if c is not None]

    def forced_grammar(self, tools: Sequence[FunctionTool], parallel: bool) -> str:
        start = 'call_json ("; " call_json)*' if parallel else "call_json"
        return "\n".join(
            [f"start: {start}", f"call_json: {lark_json(call_schema(tools, 'parameters'))}"]
        )
