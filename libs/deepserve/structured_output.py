"""Structured outputs: a constraint on the generated text, and the grammar that enforces it.

The gateway turns `response_format`, the `guided_*` fields (vLLM's names) and forced tool calls
into one `StructuredOutput`; it travels to the engine inside the sampling parameters, and the
engine compiles its grammar (llguidance) and masks every sampled token with it. Both sides build
the grammar text here, so what the gateway validated is what the engine enforces.

JSON grammars allow no free whitespace: separators are compact (`,` and `:`) and nothing may
pad them, so a model cannot loop on spaces or newlines inside a JSON value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from deepserve.errors import InvalidArgument

StructuredKind = Literal["json_schema", "json_object", "regex", "choice", "grammar", "lark"]
KINDS: tuple[StructuredKind, ...] = (
    "json_schema",
    "json_object",
    "regex",
    "choice",
    "grammar",
    "lark",
)

# No free whitespace in JSON values; compact separators.
JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ",",
    "key_separator": ":",
}
# "Any JSON object" (response_format json_object).
ANY_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
# Grammar texts longer than this are refused (a compile is CPU time in the engine).
MAX_SPEC_CHARS = 256 * 1024


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """What the output must match: a JSON schema, any JSON object, a regex, one of some
    strings, or a grammar (Lark, or GBNF/EBNF as vLLM's guided_grammar takes).

    `spec` is text: the schema as JSON, the regex, the choices as a JSON list, or the grammar.
    `field` names the request field it came from, for error messages.
    """

    kind: StructuredKind
    spec: str = ""
    field: str = "response_format"

    @classmethod
    def json_schema(cls, schema: Any, field: str = "response_format") -> StructuredOutput:
        if not isinstance(schema, dict | bool):
            raise InvalidArgument("the JSON schema must be an object", field=field)
        return cls("json_schema", _dumps(schema), field)

    @classmethod
    def choice(cls, choices: Any, field: str = "guided_choice") -> StructuredOutput:
        if (
            not isinstance(choices, list)
            or not choices
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise InvalidArgument("must be a non-empty list of non-empty strings", field=field)
        return cls("choice", _dumps(choices), field)

    def grammar(self) -> str:
        """The llguidance grammar (its JSON form) for this constraint; raises InvalidArgument."""
        import llguidance

        matcher = llguidance.LLMatcher
        if len(self.spec) > MAX_SPEC_CHARS:
            raise InvalidArgument(f"is longer than {MAX_SPEC_CHARS} characters", field=self.field)
        try:
            if self.kind == "json_schema":
                return matcher.grammar_from_json_schema(self.spec, overrides=JSON_OPTIONS)
            if self.kind == "json_object":
                return matcher.grammar_from_json_schema(ANY_OBJECT_SCHEMA, overrides=JSON_OPTIONS)
            if self.kind == "regex":
                return matcher.grammar_from_regex(self.spec)
            if self.kind == "choice":
                alternatives = " | ".join(_dumps(c) for c in json.loads(self.spec))
                return matcher.grammar_from_lark(f"start: {alternatives}")
            if self.kind == "lark":
                return matcher.grammar_from_lark(self.spec)
            if self.kind == "grammar":
                return llguidance.grammar_from("grammar", self.spec)
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(f"is not a valid {self.kind}: {exc}", field=self.field) from exc
        raise InvalidArgument(f"unknown structured output kind {self.kind!r}", field=self.field)

    def validate(self) -> str:
        """Builds and checks the grammar without a tokenizer; returns it, or raises
        InvalidArgument naming the field (an invalid schema, regex or grammar)."""
        import llguidance

        grammar = self.grammar()
        error = llguidance.LLMatcher.validate_grammar(grammar)
        if error:
            first = error.strip().splitlines()[0] if error.strip() else error
            raise InvalidArgument(f"is not a valid {_NOUN[self.kind]}: {first}", field=self.field)
        return grammar


_NOUN: dict[StructuredKind, str] = {
    "json_schema": "JSON schema",
    "json_object": "JSON object constraint",
    "regex": "regular expression",
    "choice": "list of choices",
    "grammar": "grammar",
    "lark": "grammar",
}


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
