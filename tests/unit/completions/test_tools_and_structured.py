"""Tool-call parsers, their streaming, forced-call grammars, and the structured-output fields."""

from __future__ import annotations

import json
from pathlib import Path

import llguidance
import pytest

from deepserve.completions.structured import request_constraint, response_format_constraint
from deepserve.completions.tool_parsers import (
    FunctionTool,
    ToolCallStreamer,
    detect_parser,
    parser_named,
)
from deepserve.completions.tools import parse_tools, resolve_tool_choice
from deepserve.errors import InvalidArgument
from deepserve.tokenizer import Tokenizer
from deepserve.tokenizer.chat_template import ChatTemplate

WEATHER = FunctionTool(
    "get_weather",
    "The weather in a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
ADD = FunctionTool(
    "add",
    "",
    {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    },
)

OUTPUTS = {
    "hermes": (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    ),
    "llama3_json": (
        '{"name": "get_weather", "parameters": {"city": "Paris"}}; '
        '{"name": "add", "parameters": {"a": 1, "b": 2}}'
    ),
    "mistral": (
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "add", "arguments": {"a": 1, "b": 2}}]'
    ),
}


def run(streamer: ToolCallStreamer, text: str, step: int) -> tuple[str, list[tuple[str, dict]]]:
    content, calls = "", []
    for i in range(0, len(text), step):
        events = streamer.feed(text[i : i + step])
        content += events.content
        calls += events.calls
    tail = streamer.finish()
    content += tail.content
    calls += tail.calls
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("name", sorted(OUTPUTS))
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_each_format_parses_whole_and_streamed_alike(name: str, step: int) -> None:
    content, calls = run(ToolCallStreamer(parser_named(name)), OUTPUTS[name], step)
    assert calls == [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
    assert content.strip() == ("Let me check." if name == "hermes" else "")


def test_mistral_named_call_format() -> None:
    _, calls = run(
        ToolCallStreamer(parser_named("mistral")), '[TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}', 4
    )
    assert calls == [("add", {"a": 1, "b": 2})]


@pytest.mark.parametrize(
    "name, text",
    [
        ("hermes", "Plain answer, no calls. <tool_call>\nnot json\n</tool_call>"),
        ("hermes", "Paris is in France <tool_"),
        ("llama3_json", '{"city": "Paris"} is not a call'),
        ("llama3_json", "Hello {not json"),
        ("mistral", "[TOOL_CALLS] oops"),
    ],
)
def test_auto_output_that_is_not_a_call_stays_content(name: str, text: str) -> None:
    content, calls = run(ToolCallStreamer(parser_named(name)), text, 2)
    assert calls == []
    assert content == text


def test_parallel_false_keeps_the_first_call() -> None:
    _, calls = run(ToolCallStreamer(parser_named("hermes"), parallel=False), OUTPUTS["hermes"], 5)
    assert [name for name, _ in calls] == ["get_weather"]


def test_streamed_content_never_shows_a_partial_marker() -> None:
    streamer = ToolCallStreamer(parser_named("hermes"))
    shown = [streamer.feed(piece).content for piece in ["Hi <to", "ol_c", "all>\n"]]
    assert "".join(shown) == "Hi "


def test_parser_detection_from_templates() -> None:
    assert detect_parser("{{ '<tool_call>' }}") == "hermes"
    assert detect_parser("{{ '<|python_tag|>' }} ipython") == "llama3_json"
    assert detect_parser("[TOOL_CALLS]") == "mistral"
    assert detect_parser("plain") == "hermes"


@pytest.mark.parametrize("name", sorted(OUTPUTS))
@pytest.mark.parametrize("parallel", [True, False])
def test_forced_grammars_compile_and_accept_exactly_valid_calls(name: str, parallel: bool) -> None:
    parser = parser_named(name)
    grammar = llguidance.LLMatcher.grammar_from_lark(
        parser.forced_grammar([WEATHER, ADD], parallel)
    )
    assert llguidance.LLMatcher.validate_grammar(grammar) == ""


def test_tools_and_tool_choice_validation_names_the_field() -> None:
    with pytest.raises(InvalidArgument) as bad:
        parse_tools([{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}])
    assert bad.value.field == "tools[0].function.parameters"
    with pytest.raises(InvalidArgument) as bad:
        parse_tools([{"type": "function", "function": {"name": "f", "parameters": "x"}}])
    assert bad.value.field == "tools[0].function.parameters"
    with pytest.raises(InvalidArgument) as bad:
        parse_tools([{"type": "function", "function": {"name": "bad name!"}}])
    assert bad.value.field == "tools[0].function.name"
    tools = parse_tools([WEATHER.to_openai(), {"type": "function", "name": "add"}])  # both shapes
    assert [t.name for t in tools] == ["get_weather", "add"]
    with pytest.raises(InvalidArgument) as bad:
        resolve_tool_choice({"type": "function", "function": {"name": "nope"}}, tools)
    assert bad.value.field == "tool_choice"
    assert resolve_tool_choice({"type": "function", "name": "add"}, tools) == ("function", "add")
    assert resolve_tool_choice(None, tools) == ("auto", None)
    with pytest.raises(InvalidArgument):
        resolve_tool_choice("required", [])


class _Body:
    def __init__(self, **fields: object) -> None:
        self.__dict__.update(fields)


def test_structured_fields_become_one_validated_constraint() -> None:
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    constraint = response_format_constraint(fmt)
    assert constraint is not None and constraint.kind == "json_schema"
    assert response_format_constraint({"type": "text"}) is None
    assert request_constraint(_Body(guided_choice=["a", "b"])).kind == "choice"  # type: ignore[union-attr]
    with pytest.raises(InvalidArgument) as bad:
        request_constraint(
            _Body(
                response_format={
                    "type": "json_schema",
                    "json_schema": {"schema": {"type": "objekt"}},
                }
            )
        )
    assert bad.value.field == "response_format.json_schema.schema"
    with pytest.raises(InvalidArgument) as bad:
        request_constraint(_Body(guided_regex="[a-"))
    assert bad.value.field == "guided_regex"
    with pytest.raises(InvalidArgument) as bad:
        request_constraint(_Body(guided_regex="a", guided_choice=["a"]))
    assert bad.value.field == "guided_choice"
    with pytest.raises(InvalidArgument) as bad:
        request_constraint(_Body(response_format={"type": "xml"}))
    assert bad.value.field == "response_format.type"


TOOL_TEMPLATE = (
    "{% if tools %}TOOLS:{{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}"
    "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments.city }}"
    "{% endfor %}\n{% endfor %}"
)


def test_a_template_that_renders_tools_gets_them_natively() -> None:
    template = ChatTemplate({"default": TOOL_TEMPLATE})
    assert template.renders_tools([])
    text = template.render(
        [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                    }
                ],
            },
        ],
        tools=[WEATHER.to_openai()],
    )
    assert text.startswith('TOOLS:[{"type": "function"')
    assert "CALL get_weather Oslo" in text  # arguments became an object for the template


def test_a_template_without_tools_gets_the_default_tool_prompt(default_model_dir: Path) -> None:
    tokenizer = Tokenizer.from_model_dir(default_model_dir)
    assert not tokenizer.chat_template.renders_tools([])
    text = tokenizer.apply_chat_template(
        [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ],
        tools=[WEATHER.to_openai()],
    )
    assert "<tools>" in text and '"get_weather"' in text
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
    )
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>" in text
