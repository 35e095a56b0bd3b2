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
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from deepserve.errors import FailedPrecondition, InvalidArgument

DEFAULT_TEMPLATE_NAME = "default"
TOOL_USE_TEMPLATE_NAME = "tool_use"

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


class ChatTemplate:
    """A model's named chat templates; picks one per request and renders messages to a prompt."""

    def __init__(self, templates: Mapping[str, str]) -> None:
        self._templates = dict(templates)
        self._compiled: dict[str, jinja2.Template] = {}

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
