"""Hermes-style tool calls, also Qwen2.5's: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`.

This is also the format of DeepServe's default tool prompt (for models whose chat template does
not render tools), so a model without tool training is parsed the same way.
"""

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
    lark_string,
)

OPEN = "<tool_call>"
CLOSE = "</tool_call>"


class HermesToolParser(ToolParser):
    """`<tool_call>` blocks of JSON objects with `name` and `arguments`."""

    name = "hermes"
    start_markers = (OPEN,)
    end_marker = CLOSE

    def parse_block(self, block: str) -> list[ToolCall] | None:
        inner = block.strip()
        if inner.startswith(OPEN):
            inner = inner[len(OPEN) :]
        if inner.endswith(CLOSE):
            inner = inner[: -len(CLOSE)]
        values = json_values(inner)
        if not values:
            return None
        calls = [call_from_json(v) for v in values]
        if any(c is None for c in calls):
            return None
        return [c for c in calls if c is not None]

    def forced_grammar(self, tools: Sequence[FunctionTool], parallel: bool) -> str:
        call = f"{lark_string(OPEN + chr(10))} call_json {lark_string(chr(10) + CLOSE)}"
        start = 'call ("\\n" call)*' if parallel else "call"
        return "\n".join(
            [f"start: {start}", f"call: {call}", f"call_json: {lark_json(call_schema(tools))}"]
        )
