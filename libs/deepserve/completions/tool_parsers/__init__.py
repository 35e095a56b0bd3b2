"""Tool-call parsers per model family, and which one a model gets.

A model's parser is chosen from its chat template (the markers the template writes), unless a
setting names one: `hermes` (also Qwen2.5, and the default tool prompt), `llama3_json`,
`mistral`. A template that does not render tools gets DeepServe's default tool prompt, whose
format is Hermes'.
"""

from __future__ import annotations

from deepserve.completions.tool_parsers.base import (
    FunctionTool,
    StreamEvents,
    ToolCall,
    ToolCallStreamer,
    ToolParser,
)
from deepserve.completions.tool_parsers.hermes import HermesToolParser
from deepserve.completions.tool_parsers.llama3 import Llama3JsonToolParser
from deepserve.completions.tool_parsers.mistral import MistralToolParser
from deepserve.errors import InvalidArgument

PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "qwen2.5": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
}
DEFAULT_PARSER = "hermes"


def parser_named(name: str) -> ToolParser:
    cls = PARSERS.get(name)
    if cls is None:
        raise InvalidArgument(
            f"unknown tool parser {name!r}; known: {sorted(PARSERS)}", field="tool_parser"
        )
    return cls()


def detect_parser(template_source: str) -> str:
    """The parser a chat template's tool format calls for (hermes when it shows none)."""
    if "[TOOL_CALLS]" in template_source:
        return "mistral"
    if "<tool_call>" in template_source:
        return "hermes"
    if "<|python_tag|>" in template_source or "ipython" in template_source:
        return "llama3_json"
    return DEFAULT_PARSER


__all__ = [
    "DEFAULT_PARSER",
    "PARSERS",
    "FunctionTool",
    "StreamEvents",
    "ToolCall",
    "ToolCallStreamer",
    "ToolParser",
    "detect_parser",
    "parser_named",
]
