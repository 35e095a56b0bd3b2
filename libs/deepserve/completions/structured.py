"""The OpenAI (and vLLM) request fields that constrain output, turned into one StructuredOutput.

`response_format` (`text`, `json_object`, `json_schema`) and vLLM's extra fields `guided_json`,
`guided_regex`, `guided_choice` and `guided_grammar` each describe a constraint; a request may
set one. The grammar is built and checked here (llguidance, no tokenizer), so an invalid schema,
regex or grammar is a 400 naming its field before anything is routed.
"""

from __future__ import annotations

import json
import re
from typing import Any

from deepserve.errors import InvalidArgument
from deepserve.structured_output import StructuredOutput

_SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def response_format_constraint(
    response_format: Any, field: str = "response_format"
) -> StructuredOutput | None:
    """OpenAI's `response_format` (chat) or `text.format` (Responses) as a constraint."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise InvalidArgument("must be an object", field=field)
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object", "", field)
    if kind != "json_schema":
        raise InvalidArgument(
            "type must be one of 'text', 'json_object', 'json_schema'", field=f"{field}.type"
        )
    # Chat nests the schema under json_schema; the Responses API's text.format is flat.
    spec = response_format.get(
        "json_schema", response_format if "schema" in response_format else None
    )
    spec_field = f"{field}.json_schema" if "json_schema" in response_format else field
    if not isinstance(spec, dict):
        raise InvalidArgument("a json_schema object is required", field=f"{field}.json_schema")
    name = spec.get("name")
    if name is not None and (not isinstance(name, str) or not _SCHEMA_NAME.match(name)):
        raise InvalidArgument(
            "must be 1-64 letters, digits, underscores or dashes", field=f"{spec_field}.name"
        )
    schema = spec.get("schema")
    if schema is None:
        raise InvalidArgument("a schema is required", field=f"{spec_field}.schema")
    return StructuredOutput.json_schema(schema, field=f"{spec_field}.schema")


def guided_constraints(
    *,
    guided_json: Any = None,
    guided_regex: Any = None,
    guided_choice: Any = None,
    guided_grammar: Any = None,
) -> list[StructuredOutput]:
    """vLLM's guided-decoding fields, each as a constraint (none, one, or several to refuse)."""
    found: list[StructuredOutput] = []
    if guided_json is not None:
        schema = guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise InvalidArgument(f"is not JSON: {exc}", field="guided_json") from None
        found.append(StructuredOutput.json_schema(schema, field="guided_json"))
    if guided_regex is not None:
        if not isinstance(guided_regex, str) or not guided_regex:
            raise InvalidArgument("must be a non-empty string", field="guided_regex")
        found.append(StructuredOutput("regex", guided_regex, "guided_regex"))
    if guided_choice is not None:
        found.append(StructuredOutput.choice(guided_choice, field="guided_choice"))
    if guided_grammar is not None:
        if not isinstance(guided_grammar, str) or not guided_grammar.strip():
            raise InvalidArgument("must be a non-empty string", field="guided_grammar")
        found.append(StructuredOutput("grammar", guided_grammar, "guided_grammar"))
    return found


def request_constraint(body: Any) -> StructuredOutput | None:
    """The one output constraint a chat or completion body asks for, validated; None if free."""
    candidates = guided_constraints(
        guided_json=getattr(body, "guided_json", None),
        guided_regex=getattr(body, "guided_regex", None),
        guided_choice=getattr(body, "guided_choice", None),
        guided_grammar=getattr(body, "guided_grammar", None),
    )
    from_format = response_format_constraint(getattr(body, "response_format", None))
    if from_format is not None:
        candidates.insert(0, from_format)
    if len(candidates) > 1:
        raise InvalidArgument(
            "set at most one of response_format, guided_json, guided_regex, guided_choice "
            "and guided_grammar",
            field=candidates[1].field.split(".")[0],
        )
    if not candidates:
        return None
    candidates[0].validate()
    return candidates[0]
