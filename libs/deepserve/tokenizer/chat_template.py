"""Render a model's Jinja chat template the way Hugging Face transformers renders it.

Chat templates ship with model weights and are untrusted code, so they run in Jinja's immutable
sandbox. The environment mirrors transformers' (trim_blocks, lstrip_blocks, loop controls, a
`tojson` that does not HTML-escape, `raise_exception`, `strftime_now`, a guarded `namespace`) so
that a prompt rendered here is byte-identical to the one the model was fine-tuned on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from deepserve.errors import FailedPrecondition, InvalidArgument

DEFAULT_TEMPLATE_NAME = "default"
TOOL_USE_TEMPLATE_NAME = "tool_use"

# The default tool prompt: for chat templates that do not render tools themselves (they never
# read the `tools` variable), the tools are described in a system message in this wording and
# the model is asked for Hermes-style calls, which the `hermes` tool parser reads back. Earlier
# calls and their results are written into the conversation the same way: an assistant turn's
# tool_calls become <tool_call> blocks in its content, and tool messages become a user turn of
# <tool_response> blocks (consecutive results in one turn), so templates that know only
# system/user/assistant render a tool conversation too.
DEFAULT_TOOL_PROMPT = (
    "You can call functions to help with the request. These are the functions available, "
    "as JSON signatures:\n<tools>\n{tools}\n</tools>\n"
    "To call one or more functions, reply with one block per call, each holding a JSON object "
    "with the function's name and its arguments:\n"
    '<tool_call>\n{{"name": "<function name>", "arguments": {{<arguments>}}}}\n</tool_call>\n'
    "Each result comes back in a <tool_response></tool_response> block."
)

# Names under which a message's reasoning may arrive; templates read the first, gpt-oss's read
# "thinking". transformers fills both, so we do too.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (used for training masks) and renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(
            lineno
        )

    def _render_body(self, caller: Any) -> str:
        return caller()


class _GuardedNamespace(jinja2.utils.Namespace):
    """A `namespace()` that refuses underscore attributes, closing a path to Python internals."""

    # `self` travels in *args, as in Jinja's Namespace, so `namespace(self=...)` still works.
    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _GuardedNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _GuardedNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


class _DictFactory:
    """`dict(...)` for templates without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's built-in tojson HTML-escapes '<', '>' and '&', which would change the prompt.
    return json.dumps(
        value,
        ensure_ascii=ensure_ascii,
        indent=indent,
        separators=separators,
        sort_keys=sort_keys,
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _DictFactory()
    env.globals["namespace"] = _GuardedNamespace
    return env


def _plain(value: Any) -> Any:
    """Rebuild `value` from JSON types so the sandbox never sees methods of rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump):
        return _plain(model_dump())
    return f"<{type(value).__name__}>"


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as plain dicts, None-valued keys dropped, reasoning aliased as transformers does."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
        raise InvalidArgument("must be a non-empty list of messages", field="messages")
    normalized: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidArgument(f"message {index} is not an object", field="messages")
        # APIs send content=None or tool_calls=None; templates handle a missing key, not None.
        plain = {k: v for k, v in _plain(message).items() if v is not None}
        reasoning = next((plain[k] for k in _REASONING_FIELDS if k in plain), None)
        if reasoning is not None:
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        normalized.append(plain)
    return normalized


def _arguments_object(arguments: Any) -> Any:
    """OpenAI sends a call's arguments as JSON text; templates expect the object."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def _call_json(call: Mapping[str, Any]) -> dict[str, Any]:
    function = call.get("function", call)
    return {
        "name": function.get("name", ""),
        "arguments": _arguments_object(function.get("arguments", {})),
    }


def native_tool_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template that renders tools itself: each call's arguments as an object
    (as transformers' templates expect) and an empty content beside tool calls."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if calls:
            message = {
                **message,
                "content": message.get("content") or "",
                "tool_calls": [
                    {
                        **call,
                        "function": {
                            **call.get("function", {}),
                            "arguments": _arguments_object(
                                call.get("function", {}).get("arguments", {})
                            ),
                        },
                    }
                    for call in calls
                    if isinstance(call, Mapping)
                ],
            }
        out.append(message)
    return out


def default_tool_messages(
    messages: list[dict[str, Any]], tools: Sequence[Mapping[str, Any]] | None
) -> list[dict[str, Any]]:
    """Messages for a template without tool support: the default tool prompt in the system
    message, calls and results written as text (see DEFAULT_TOOL_PROMPT)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        calls = message.get("tool_calls")
        if role == "assistant" and calls:
            blocks = [
                "<tool_call>\n" + json.dumps(_call_json(c), ensure_ascii=False) + "\n</tool_call>"
                for c in calls
                if isinstance(c, Mapping)
            ]
            text = message.get("content") or ""
            content = "\n".join([text, *blocks] if text else blocks)
            out.append(
                {k: v for k, v in message.items() if k != "tool_calls"} | {"content": content}
            )
        elif role == "tool":
            block = f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"
            previous = out[-1] if out else None
            if previous is not None and previous.get("_tool_results"):
                previous["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
        else:
            out.append(dict(message))
    for message in out:
        message.pop("_tool_results", None)
    if tools:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        prompt = DEFAULT_TOOL_PROMPT.format(tools=listing)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{prompt}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


class ChatTemplate:
    """A model's named chat templates; picks one per request and renders messages to a prompt."""

    def __init__(self, templates: Mapping[str, str]) -> None:
        self._templates = dict(templates)
        self._compiled: dict[str, jinja2.Template] = {}
        self._reads_tools: dict[str, bool] = {}

    @property
    def names(self) -> list[str]:
        return sorted(self._templates)

    def source(self, tools: Sequence[Any] | None = None) -> str:
        """The template text transformers would pick: tool_use when tools are given, else default."""
        if tools is not None and TOOL_USE_TEMPLATE_NAME in self._templates:
            return self._templates[TOOL_USE_TEMPLATE_NAME]
        if DEFAULT_TEMPLATE_NAME in self._templates:
            return self._templates[DEFAULT_TEMPLATE_NAME]
        if not self._templates:
            raise FailedPrecondition("the model has no chat template")
        raise FailedPrecondition(
            f"the model has several chat templates and none is named 'default': {self.names}"
        )

    def renders_tools(self, tools: Sequence[Any] | None = None) -> bool:
        """Whether the template picked for these tools reads the `tools` variable itself."""
        try:
            source = self.source(tools if tools is not None else [])
        except FailedPrecondition:
            return False
        # Asked on every request: parsing the template each time cost ~8% of a gateway's CPU.
        reads = self._reads_tools.get(source)
        if reads is None:
            try:
                parsed = _environment().parse(source)
            except jinja2.TemplateSyntaxError:
                reads = False
            else:
                reads = "tools" in jinja2.meta.find_undeclared_variables(parsed)
            self._reads_tools[source] = reads
        return reads

    def _compile(self, source: str) -> jinja2.Template:
        template = self._compiled.get(source)
        if template is None:
            try:
                template = _environment().from_string(source)
            except jinja2.TemplateSyntaxError as exc:
                raise FailedPrecondition(
                    f"the model's chat template does not compile: {exc}"
                ) from exc
            self._compiled[source] = template
        return template

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        special_tokens: Mapping[str, str] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render messages; errors raised by the template become InvalidArgument(field="messages")."""
        template = self._compile(self.source(tools))
        chat = normalize_messages(messages)
        if self.renders_tools(tools):
            chat = native_tool_messages(chat)
        else:
            chat, tools = default_tool_messages(chat, tools), None
        variables: dict[str, Any] = dict(special_tokens or {})
        # Caller kwargs (e.g. enable_thinking) override the special tokens, as in transformers.
        variables.update(_plain(template_kwargs))
        try:
            return template.render(
                messages=chat,
                tools=_plain(list(tools)) if tools is not None else None,
                documents=_plain(list(documents)) if documents is not None else None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except Exception as exc:
            # The template is code shipped with the model that inspects the request; whatever it
            # raises (raise_exception, undefined attributes, type errors) is a verdict on the input.
            raise InvalidArgument(
                f"chat template rejected the messages: {exc}", field="messages"
            ) from exc
