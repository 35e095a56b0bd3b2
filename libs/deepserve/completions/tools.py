"""Tool calling on the request side: checking `tools` and `tool_choice`, and what they ask of
the engine and of the response.

`tools` are function tools (chat's nested `{"type": "function", "function": {...}}` or the
Responses API's flat shape); each one's `parameters` must be a JSON schema the grammar
compiler accepts. `tool_choice` is `none`, `auto` (the model decides; text that does not parse
as a call is content), `required` (one or more calls) or a named function. `required` and a
named function are enforced by a grammar of the model's own call format, so every call parses
and its arguments match the function's parameters schema.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from deepserve.completions.tool_parsers import (
    DEFAULT_PARSER,
    FunctionTool,
    ToolCallStreamer,
    ToolParser,
    detect_parser,
    parser_named,
)
from deepserve.errors import InvalidArgument
from deepserve.structured_output import StructuredOutput
from deepserve.tokenizer import Tokenizer

ToolChoiceMode = Literal["none", "auto", "required", "function"]
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOOLS = 128
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def parse_tools(raw: Any, field: str = "tools") -> list[FunctionTool]:
    """Function tools from a request (chat or Responses shape); InvalidArgument names the field."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidArgument("must be a list of tools", field=field)
    if len(raw) > MAX_TOOLS:
        raise InvalidArgument(f"at most {MAX_TOOLS} tools", field=field)
    tools: list[FunctionTool] = []
    seen: set[str] = set()
    for i, entry in enumerate(raw):
        where = f"{field}[{i}]"
        if not isinstance(entry, dict):
            raise InvalidArgument("must be an object", field=where)
        if entry.get("type", "function") != "function":
            raise InvalidArgument("only function tools are supported", field=f"{where}.type")
        nested = isinstance(entry.get("function"), dict)
        spec = entry["function"] if nested else entry
        where = f"{where}.function" if nested else where
        name = spec.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidArgument(
                "must be 1-64 letters, digits, underscores or dashes", field=f"{where}.name"
            )
        if name in seen:
            raise InvalidArgument(f"two tools are named {name!r}", field=f"{where}.name")
        seen.add(name)
        parameters = spec.get("parameters")
        if parameters is None:
            parameters = dict(EMPTY_PARAMETERS)
        if not isinstance(parameters, dict):
            raise InvalidArgument("must be a JSON schema object", field=f"{where}.parameters")
        StructuredOutput.json_schema(parameters, field=f"{where}.parameters").validate()
        description = spec.get("description") or ""
        if not isinstance(description, str):
            raise InvalidArgument("must be a string", field=f"{where}.description")
        tools.append(FunctionTool(name, description, parameters, bool(spec.get("strict"))))
    return tools


def resolve_tool_choice(
    raw: Any, tools: Sequence[FunctionTool], field: str = "tool_choice"
) -> tuple[ToolChoiceMode, str | None]:
    """(mode, function name): `none`, `auto`, `required`, or `function` with its name."""
    if raw is None:
        return ("auto" if tools else "none"), None
    if isinstance(raw, str):
        if raw not in ("none", "auto", "required"):
            raise InvalidArgument("must be 'none', 'auto', 'required' or a function", field=field)
        if raw == "required" and not tools:
            raise InvalidArgument("'required' needs tools", field=field)
        return raw, None  # type: ignore[return-value]
    if isinstance(raw, dict) and raw.get("type") == "function":
        spec = raw.get("function") if isinstance(raw.get("function"), dict) else raw
        name = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str) or not name:
            raise InvalidArgument("names no function", field=f"{field}.function.name")
        if name not in {t.name for t in tools}:
            raise InvalidArgument(f"names {name!r}, which is not among the tools", field=field)
        return "function", name
    raise InvalidArgument("must be 'none', 'auto', 'required' or a function", field=field)


@dataclass(frozen=True, slots=True)
class ToolSetup:
    """A request's tools, its choice, and the parser that reads calls from the model's text."""

    tools: list[FunctionTool]
    mode: ToolChoiceMode
    function: str | None
    parallel: bool
    parser: ToolParser

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "function")

    @property
    def offered(self) -> list[FunctionTool]:
        """The tools the prompt shows: none under `none`."""
        return [] if self.mode == "none" else self.tools

    def constraint(self) -> StructuredOutput | None:
        """The grammar that forces a call (required, named); None when the model decides."""
        if not self.forced:
            return None
        tools = [t for t in self.tools if self.function is None or t.name == self.function]
        grammar = self.parser.forced_grammar(tools, self.parallel and self.function is None)
        return StructuredOutput("lark", grammar, "tool_choice")

    def streamer(self) -> ToolCallStreamer:
        return ToolCallStreamer(self.parser, forced=self.forced, parallel=self.parallel)


def parser_for_model(tokenizer: Tokenizer, override: str = "") -> ToolParser:
    """The model's tool-call parser: the override if set, else what its template writes."""
    if override:
        return parser_named(override)
    chat = tokenizer.chat_template
    if not chat.renders_tools([]):
        return parser_named(DEFAULT_PARSER)  # the default tool prompt asks for Hermes calls
    try:
        source = chat.source([])
    except Exception:
        return parser_named(DEFAULT_PARSER)
    return parser_named(detect_parser(source))


def tool_setup(
    tools_raw: Any,
    tool_choice: Any,
    parallel_tool_calls: bool | None,
    tokenizer: Tokenizer,
    *,
    parser_override: str = "",
    tools_field: str = "tools",
) -> ToolSetup | None:
    """The request's tool setup, validated; None when it names no tools."""
    tools = parse_tools(tools_raw, tools_field)
    mode, function = resolve_tool_choice(tool_choice, tools)
    if not tools:
        return None
    return ToolSetup(
        tools=tools,
        mode=mode,
        function=function,
        parallel=True if parallel_tool_calls is None else parallel_tool_calls,
        parser=parser_for_model(tokenizer, parser_override),
    )
