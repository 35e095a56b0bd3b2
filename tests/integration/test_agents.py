"""Agent serving on a real local cluster through the official `openai` client (and gRPC).

Starts real processes: `deepserve up` (etcd, valkey-server, scheduler, jobmgr, podpool, gateway,
a flowserve pod serving smollm2-135m), then deploys a tiny random Llama beside it (`deepserve
deploy`), whose every output token comes from the grammar. Outputs are validated with
`jsonschema`; tool-call arguments must parse and match the function's parameters. The gateway
is killed mid-module (the supervisor restarts it) to show Responses conversations survive it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from deepserve.models.catalog import DEFAULT_MODEL
from deepserve.rpc.client import insecure_channel
from deepserve.store.etcd import EtcdStore
from deepserve.tenancy.api_keys import ApiKeys
from deepserve.tokenizer import Tokenizer
from deepserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.cluster_harness import RunningCluster, local_cluster
from tests.tiny_model import make_tiny_llama

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MODEL = DEFAULT_MODEL
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "London", "Tokyo"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": WEATHER_PARAMS,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                    "b": {"type": "integer", "minimum": -1000, "maximum": 1000},
                },
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]


def _listed(url: str) -> list[str]:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as resp:
        return [m["id"] for m in json.load(resp)["data"]]


def wait_for(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            found = check()
        except (OSError, openai.APIError):
            found = None
        if found:
            return found
        time.sleep(0.3)
    raise TimeoutError(what)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    run_dir = tmp_path_factory.mktemp("agents")
    with local_cluster(run_dir, model=MODEL, timeout_s=240) as running:
        url = running.layout.gateway_url
        wait_for(lambda: MODEL in _listed(url), 180, f"{MODEL} not served")
        yield running


@pytest.fixture(scope="module")
def url(cluster: RunningCluster) -> str:
    return cluster.layout.gateway_url


@pytest.fixture(scope="module")
def tiny(cluster: RunningCluster, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Llama deployed beside the default model: its output is all grammar."""
    model_dir = make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama", vocab_size=300)
    # Its byte-level tokenizer spells the tool prompt out byte by byte: give it room.
    config = json.loads((model_dir / "config.json").read_text())
    config["max_position_embeddings"] = 4096
    (model_dir / "config.json").write_text(json.dumps(config))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "deepserve.cli.main",
            "deploy",
            str(model_dir),
            "--run-dir",
            str(cluster.layout.run_dir),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    url = cluster.layout.gateway_url
    wait_for(lambda: str(model_dir) in _listed(url), 180, "the tiny model was not served")
    return str(model_dir)


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_model_dir(default_model_dir)


def client(url: str, key: str = "EMPTY") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=180)


async def _new_key(cluster: RunningCluster) -> str:
    async with EtcdStore(cluster.layout.etcd_endpoint) as etcd:
        key, _ = await ApiKeys(etcd).create(f"agents-{uuid.uuid4().hex[:8]}")
    return key


def check_calls(calls: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for call in calls:
        assert call.type == "function" and call.id
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, PARAMS[call.function.name])
        out.append((call.function.name, args))
    return out


def streamed_chat(c: openai.OpenAI, **kw: Any) -> tuple[str, dict[int, dict[str, str]], str | None]:
    """Text, tool calls by index (accumulated from deltas) and the finish reason of a stream."""
    text, calls, finish = "", {}, None
    for chunk in c.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for tc in choice.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                slot["id"] = tc.id or slot["id"]
                if tc.function is not None:
                    slot["name"] += tc.function.name or ""
                    slot["arguments"] += tc.function.arguments or ""
            finish = choice.finish_reason or finish
    return text, calls, finish


# --- structured outputs -------------------------------------------------------------------


@pytest.mark.parametrize("which", ["default", "tiny"])
def test_json_schema_output_validates_sync_and_streamed(url: str, tiny: str, which: str) -> None:
    model = MODEL if which == "default" else tiny
    c = client(url)
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }
    messages = [{"role": "user", "content": "Describe a person as JSON."}]
    whole = c.chat.completions.create(
        model=model, messages=messages, response_format=fmt, max_tokens=120, temperature=0.8, seed=1
    )  # type: ignore[arg-type]
    assert whole.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(whole.choices[0].message.content or ""), PERSON)
    text, _, finish = streamed_chat(
        c, model=model, messages=messages, response_format=fmt, max_tokens=120, temperature=0.8
    )
    assert finish == "stop"
    jsonschema.validate(json.loads(text), PERSON)
    obj = c.chat.completions.create(
        model=model, messages=messages, response_format={"type": "json_object"}, max_tokens=200
    )  # type: ignore[arg-type]
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content or ""), dict)


def test_guided_choice_regex_and_grammar(url: str, tiny: str) -> None:
    c = client(url)
    for model in (MODEL, tiny):
        choice = c.completions.create(
            model=model,
            prompt="Sentiment of 'I love it':",
            max_tokens=10,
            extra_body={"guided_choice": ["positive", "negative"]},
        )
        assert choice.choices[0].text in ("positive", "negative")
        regex = c.completions.create(
            model=model,
            prompt="A date:",
            max_tokens=20,
            extra_body={"guided_regex": r"\d{4}-\d{2}"},
        )
        assert len(regex.choices[0].text) == 7 and regex.choices[0].text[4] == "-"
        grammar = c.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "yes or no?"}],
            max_tokens=5,
            extra_body={"guided_grammar": 'root ::= "yes" | "no"'},
        )  # type: ignore[arg-type]
        assert grammar.choices[0].message.content in ("yes", "no")


def test_bad_schema_and_tool_input_are_400s_naming_the_field(url: str) -> None:
    c = client(url)
    with pytest.raises(openai.BadRequestError) as bad:
        c.chat.completions.create(
            model=MODEL,
            messages=ASK,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "objekt"}},
            },
        )  # type: ignore[arg-type]
    assert bad.value.param == "response_format.json_schema.schema"
    with pytest.raises(openai.BadRequestError) as bad:
        c.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=[
                {"type": "function", "function": {"name": "f", "parameters": {"properties": 1}}}
            ],
        )  # type: ignore[arg-type]
    assert bad.value.param == "tools[0].function.parameters"
    with pytest.raises(openai.BadRequestError) as bad:
        c.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert bad.value.param == "tool_choice"


# --- tool calling -------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["default", "tiny"])
def test_required_and_named_tool_calls_parse_and_validate(url: str, tiny: str, which: str) -> None:
    model = MODEL if which == "default" else tiny
    c = client(url)
    # One call (parallel off): a small model may otherwise go on calling until max_tokens.
    required = c.chat.completions.create(
        model=model,
        messages=ASK,
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=150,
    )
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert check_calls(choice.message.tool_calls or [])
    named = c.chat.completions.create(
        model=model,
        messages=ASK,
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "add"}},
        parallel_tool_calls=False,
        max_tokens=100,
    )
    [(name, _)] = check_calls(named.choices[0].message.tool_calls or [])
    assert name == "add"
    text, calls, finish = streamed_chat(
        c,
        model=model,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=150,
    )
    assert finish == "tool_calls" and calls and not text.strip()
    for slot in calls.values():
        jsonschema.validate(json.loads(slot["arguments"]), PARAMS[slot["name"]])


def test_auto_tool_conversation_round_trip(url: str) -> None:
    c = client(url)
    first = c.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, max_tokens=80, temperature=0
    )  # type: ignore[arg-type]
    message = first.choices[0].message
    if message.tool_calls:  # the model decided to call: the arguments must parse
        assert first.choices[0].finish_reason == "tool_calls"
        for call in message.tool_calls:
            json.loads(call.function.arguments)
    else:  # anything else is content, not an error
        assert message.content
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "unit": "celsius"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    followup = c.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=30)  # type: ignore[arg-type]
    assert followup.choices[0].finish_reason in ("stop", "length", "tool_calls")


async def test_grpc_forced_tool_call(cluster: RunningCluster) -> None:
    async with insecure_channel(cluster.layout.address("gateway"), traced=False) as ch:
        reply = await gateway_pb2_grpc.GatewayServiceStub(ch).CreateChatCompletion(
            gateway_pb2.CreateChatCompletionRequest(
                params=gateway_pb2.ChatCompletionParams(
                    model=MODEL,
                    messages=[gateway_pb2.ChatMessage(role="user", content=ASK[0]["content"])],
                    options=gateway_pb2.GenerationOptions(
                        sampling=common_pb2.SamplingParams(max_tokens=120)
                    ),
                    tools=[
                        gateway_pb2.Tool(
                            name="get_weather", parameters_json=json.dumps(WEATHER_PARAMS)
                        )
                    ],
                    tool_choice=gateway_pb2.ToolChoice(mode="required"),
                    parallel_tool_calls=False,
                )
            ),
            timeout=120,
        )
    [call] = reply.choices[0].tool_calls[:1]
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMS)


# --- prefix cache: exact cached tokens, tenant salts, cached contexts -----------------------


def test_cached_tokens_are_exact_and_tenants_do_not_share(
    cluster: RunningCluster, url: str, tokenizer: Tokenizer
) -> None:
    prompt = "Count the colours of the rainbow, slowly and carefully, one by one: " * 4
    ids = tokenizer.encode(prompt)
    key_a, key_b = asyncio.run(_new_key(cluster)), asyncio.run(_new_key(cluster))
    a, b = client(url, key_a), client(url, key_b)
    first = a.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    again = a.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    other = b.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    assert first.usage is not None and again.usage is not None and other.usage is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0  # type: ignore[union-attr]
    # Every full 16-token block but the one holding the last token (it must be computed).
    assert again.usage.prompt_tokens_details.cached_tokens == (len(ids) - 1) // 16 * 16  # type: ignore[union-attr]
    assert other.usage.prompt_tokens_details.cached_tokens == 0  # type: ignore[union-attr]


def test_cached_context_create_use_list_delete(url: str, tokenizer: Tokenizer) -> None:
    import httpx

    system = [{"role": "system", "content": "You answer questions about the solar system. " * 12}]
    with httpx.Client(base_url=url, timeout=120) as http:
        made = http.post(
            "/v1/cached_contexts", json={"model": MODEL, "messages": system, "ttl_seconds": 120}
        )
        assert made.status_code == 200, made.text
        ctx = made.json()
        assert ctx["pinned_tokens"] == ctx["tokens"] // 16 * 16 > 0
        assert ctx["id"] in [x["id"] for x in http.get("/v1/cached_contexts").json()["data"]]
        c = client(url)
        for stream in (False, True):
            kwargs = {
                "model": MODEL,
                "messages": [{"role": "user", "content": "How many planets are there?"}],
                "max_tokens": 8,
                "extra_body": {"cached_context_id": ctx["id"]},
            }
            if stream:
                chunks = list(
                    c.chat.completions.create(
                        stream=True, stream_options={"include_usage": True}, **kwargs
                    )
                )
                usage = chunks[-1].usage
            else:
                usage = c.chat.completions.create(**kwargs).usage
            assert usage is not None
            assert usage.prompt_tokens_details.cached_tokens >= ctx["pinned_tokens"]  # type: ignore[union-attr]
        assert http.delete(f"/v1/cached_contexts/{ctx['id']}").status_code == 200
        assert http.get(f"/v1/cached_contexts/{ctx['id']}").status_code == 404
    with pytest.raises(openai.NotFoundError):
        client(url).chat.completions.create(
            model=MODEL, messages=ASK, extra_body={"cached_context_id": ctx["id"]}
        )  # type: ignore[arg-type]


# --- the Responses API, across a gateway restart ----------------------------------------------


def test_responses_multi_turn_reuses_kv_and_survives_a_gateway_restart(
    cluster: RunningCluster, url: str
) -> None:
    key = asyncio.run(_new_key(cluster))
    c = client(url, key)
    instructions = "You are a terse assistant. " * 6
    first = c.responses.create(
        model=MODEL,
        instructions=instructions,
        input="My name is Ada. Say hi.",
        max_output_tokens=12,
    )
    assert first.output_text and first.usage is not None
    events = []
    for event in c.responses.create(
        model=MODEL,
        instructions=instructions,
        input="What is my name?",
        previous_response_id=first.id,
        max_output_tokens=12,
        stream=True,
    ):
        events.append(event)
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in (
        "response.completed",
        "response.incomplete",
    )
    assert "response.output_text.delta" in kinds
    second = events[-1].response
    assert second.usage is not None
    # The earlier turn's prompt was the prefix: its KV was reused.
    assert (
        second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens // 16 * 16 - 16
    )
    assert second.usage.input_tokens_details.cached_tokens > 0

    os.kill(cluster.pids()["gateway"], signal.SIGKILL)
    time.sleep(1)
    wait_for(lambda: MODEL in _listed(url), 120, "the gateway did not come back")
    third = c.responses.create(
        model=MODEL,
        instructions=instructions,
        input="And again: what is my name?",
        previous_response_id=second.id,
        max_output_tokens=12,
    )
    assert third.previous_response_id == second.id
    assert c.responses.retrieve(first.id).id == first.id
    other = client(url, asyncio.run(_new_key(cluster)))
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model=MODEL, input="x", previous_response_id=third.id)
    tool_turn = c.responses.create(
        model=MODEL,
        input="Weather in Paris?",
        tools=[{"type": "function", **TOOLS[0]["function"]}],  # type: ignore[list-item]
        tool_choice="required",
        max_output_tokens=100,
    )
    [call] = [item for item in tool_turn.output if item.type == "function_call"][:1]
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMS)
    c.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(first.id)
