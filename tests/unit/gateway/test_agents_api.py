"""Agent serving at the gateway, in front of the echo engine: what structured outputs, tools,
the Responses API, cached contexts and cache salts send to the engine, and the 400/404s."""

from __future__ import annotations

import json

import grpc
import httpx
import openai
import pytest

from deepserve.completions.prepare import cache_salt_for
from deepserve.prefix_hash import prompt_block_hashes
from deepserve.rpc.client import insecure_channel
from deepserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.unit.gateway.conftest import BLOCK_SIZE, GatewayHarness

pytestmark = pytest.mark.timeout(60)

SCHEMA = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
HI = [{"role": "user", "content": "hi"}]


def client(h: GatewayHarness, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{h.http_url}/v1", api_key=key, max_retries=0)


def last_seen(h: GatewayHarness):
    return h.engine.record.seen[-1]


async def test_response_format_and_guided_fields_travel_to_the_engine(
    harness: GatewayHarness,
) -> None:
    tenant, key = await harness.new_key()
    c = client(harness, key)
    await c.chat.completions.create(
        model=harness.model,
        messages=HI,
        max_tokens=3,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}},
    )
    seen = last_seen(harness)
    assert seen.sampling.structured_output.kind == common_pb2.STRUCTURED_OUTPUT_KIND_JSON_SCHEMA
    assert json.loads(seen.sampling.structured_output.spec) == SCHEMA
    assert seen.cache_salt == cache_salt_for(tenant, None)
    await c.completions.create(
        model=harness.model, prompt="p", max_tokens=2, extra_body={"guided_regex": "[0-9]+"}
    )
    so = last_seen(harness).sampling.structured_output
    assert (so.kind, so.spec) == (common_pb2.STRUCTURED_OUTPUT_KIND_REGEX, "[0-9]+")


@pytest.mark.parametrize(
    "extra, param",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}},
            "response_format.json_schema.schema",
        ),
        ({"guided_json": {"properties": 3}}, "guided_json"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": "nope"}}]},
            "tools[0].function.parameters",
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
    ],
)
async def test_bad_structured_or_tool_input_is_a_400_naming_the_field(
    harness: GatewayHarness, extra: dict, param: str
) -> None:
    _, key = await harness.new_key()
    with pytest.raises(openai.BadRequestError) as bad:
        await client(harness, key).chat.completions.create(
            model=harness.model, messages=HI, max_tokens=2, extra_body=extra
        )
    assert bad.value.param == param


async def test_tool_conversations_are_accepted_and_forced_calls_carry_a_grammar(
    harness: GatewayHarness,
) -> None:
    _, key = await harness.new_key()
    messages = [
        {"role": "user", "content": "weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    c = client(harness, key)
    resp = await c.chat.completions.create(
        model=harness.model, messages=messages, tools=[WEATHER], max_tokens=4
    )
    assert resp.choices[0].finish_reason == "length"
    prompt = harness.tokenizer.decode(list(last_seen(harness).prompt_token_ids))
    assert "<tool_response>\nsunny\n</tool_response>" in prompt
    await c.chat.completions.create(
        model=harness.model, messages=HI, tools=[WEATHER], tool_choice="required", max_tokens=4
    )
    so = last_seen(harness).sampling.structured_output
    assert so.kind == common_pb2.STRUCTURED_OUTPUT_KIND_LARK
    assert "get_weather" in so.spec


async def test_responses_store_continue_retrieve_and_delete_per_tenant(
    harness: GatewayHarness,
) -> None:
    _, key = await harness.new_key()
    _, other_key = await harness.new_key()
    c = client(harness, key)
    first = await c.responses.create(
        model=harness.model, input="first turn", instructions="be brief", max_output_tokens=4
    )
    assert first.status == "incomplete"  # the echo engine hit max_output_tokens
    assert first.output[0].type == "message" and first.output_text
    first_prompt = list(last_seen(harness).prompt_token_ids)
    second = await c.responses.create(
        model=harness.model,
        input="second turn",
        instructions="be brief",
        previous_response_id=first.id,
        max_output_tokens=4,
    )
    second_prompt = list(last_seen(harness).prompt_token_ids)
    # The earlier turn's prompt is the token prefix of the next one (so its KV is reused).
    assert second_prompt[: len(first_prompt)] == first_prompt
    assert harness.tokenizer.decode(second_prompt).count("first turn") == 1
    assert (await c.responses.retrieve(second.id)).id == second.id
    with pytest.raises(openai.NotFoundError):
        await client(harness, other_key).responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as missing:
        await client(harness, other_key).responses.create(
            model=harness.model, input="x", previous_response_id=first.id
        )
    assert missing.value.body["param"] == "previous_response_id"  # type: ignore[index]
    await c.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        await c.responses.retrieve(first.id)


async def test_responses_stream_events_in_openai_order(harness: GatewayHarness) -> None:
    _, key = await harness.new_key()
    stream = await client(harness, key).responses.create(
        model=harness.model, input="stream it", max_output_tokens=5, stream=True
    )
    kinds, text = [], ""
    async for event in stream:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert text


async def test_cached_contexts_create_use_list_delete(harness: GatewayHarness) -> None:
    tenant, key = await harness.new_key()
    headers = {"authorization": f"Bearer {key}"}
    system = [{"role": "system", "content": "A long shared system prompt " * 8}]
    async with httpx.AsyncClient(base_url=harness.http_url, headers=headers) as http:
        made = await http.post(
            "/v1/cached_contexts",
            json={"model": harness.model, "messages": system, "ttl_seconds": 60},
        )
        assert made.status_code == 200, made.text
        ctx = made.json()
        assert ctx["tokens"] > 16 and ctx["pinned_tokens"] == ctx["tokens"] // 16 * 16
        pinned = harness.engine.record.pinned[ctx["id"]]
        assert pinned.cache_salt == cache_salt_for(tenant, None)
        listed = (await http.get("/v1/cached_contexts")).json()["data"]
        assert [c["id"] for c in listed] == [ctx["id"]]

        c = client(harness, key)
        await c.chat.completions.create(
            model=harness.model,
            messages=HI,
            max_tokens=2,
            extra_body={"cached_context_id": ctx["id"]},
        )
        seen = last_seen(harness)
        assert seen.cached_context_id == ctx["id"]
        assert list(seen.prompt_token_ids[: ctx["tokens"]]) == list(pinned.prompt_token_ids)
        assert seen.cached_context_tokens == ctx["tokens"]
        routed = harness.scheduler.requests[-1]
        assert routed.cached_context_id == ctx["id"]

        assert (await http.delete(f"/v1/cached_contexts/{ctx['id']}")).status_code == 200
        assert ctx["id"] not in harness.engine.record.pinned  # unpinned on the instance
        gone = await http.get(f"/v1/cached_contexts/{ctx['id']}")
        assert gone.status_code == 404
    with pytest.raises(openai.NotFoundError) as missing:
        await client(harness, key).chat.completions.create(
            model=harness.model, messages=HI, extra_body={"cached_context_id": "ctx_nope"}
        )
    assert missing.value.body["param"] == "cached_context_id"  # type: ignore[index]


async def test_two_tenants_hash_apart_unless_they_share_a_salt(harness: GatewayHarness) -> None:
    prompt = "a prompt long enough to fill several blocks of the prefix cache " * 2
    hashes = []
    for shared in (None, None, "team", "team"):
        _, key = await harness.new_key()
        extra = {"cache_salt": shared} if shared else {}
        await client(harness, key).completions.create(
            model=harness.model, prompt=prompt, max_tokens=1, extra_body=extra
        )
        hashes.append(list(harness.scheduler.requests[-1].prefix_block_hashes))
    ids = harness.tokenizer.encode(prompt)
    assert hashes[0] and hashes[0] != hashes[1]  # two tenants: no shared block
    assert hashes[2] == hashes[3] == prompt_block_hashes(ids, BLOCK_SIZE, "shared:team")
    assert hashes[0] != prompt_block_hashes(ids, BLOCK_SIZE)  # never the unsalted chain


CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


async def test_tool_calls_come_back_as_message_tool_calls_whole_and_streamed(
    harness: GatewayHarness,
) -> None:
    # The echo engine repeats the prompt, which holds a call in the user's own words: the
    # model's "output" therefore contains one valid call (and the tool prompt's invalid one).
    _, key = await harness.new_key()
    c = client(harness, key)
    messages = [{"role": "user", "content": CALL_TEXT}]
    whole = await c.chat.completions.create(
        model=harness.model, messages=messages, tools=[WEATHER], max_tokens=300
    )
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo"}
    assert call.id.startswith("call_")
    stream = await c.chat.completions.create(
        model=harness.model, messages=messages, tools=[WEATHER], max_tokens=300, stream=True
    )
    names, arguments, finish, content = [], "", None, ""
    async for chunk in stream:
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                assert tc.index == 0
                names.append(tc.function.name) if tc.function and tc.function.name else None
                arguments += (tc.function.arguments or "") if tc.function else ""
            finish = ch.finish_reason or finish
    assert names == ["get_weather"]
    assert json.loads(arguments) == {"city": "Oslo"}
    assert finish == "tool_calls"
    assert content.strip() == (choice.message.content or "").strip()
    assert (
        "get_weather"
        not in content.split("<tools>")[-1].split("</tools>")[-1].split("<|im_start|>user")[-1]
    )


async def test_grpc_offers_tools_response_format_responses_and_cached_contexts(
    harness: GatewayHarness,
) -> None:
    _, key = await harness.new_key()
    _, other = await harness.new_key()
    stub = gateway_pb2_grpc.GatewayServiceStub(insecure_channel(harness.grpc_address, traced=False))
    meta = (("authorization", f"Bearer {key}"),)
    tool = gateway_pb2.Tool(
        name="get_weather",
        parameters_json=json.dumps(WEATHER["function"]["parameters"]),  # type: ignore[index]
    )
    chat = await stub.CreateChatCompletion(
        gateway_pb2.CreateChatCompletionRequest(
            params=gateway_pb2.ChatCompletionParams(
                model=harness.model,
                messages=[gateway_pb2.ChatMessage(role="user", content=CALL_TEXT)],
                options=gateway_pb2.GenerationOptions(
                    sampling=common_pb2.SamplingParams(max_tokens=300)
                ),
                tools=[tool],
            )
        ),
        metadata=meta,
    )
    [call] = chat.choices[0].tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Oslo"}
    await stub.CreateChatCompletion(
        gateway_pb2.CreateChatCompletionRequest(
            params=gateway_pb2.ChatCompletionParams(
                model=harness.model,
                messages=[gateway_pb2.ChatMessage(role="user", content="x")],
                options=gateway_pb2.GenerationOptions(
                    sampling=common_pb2.SamplingParams(max_tokens=2)
                ),
                response_format=gateway_pb2.ResponseFormat(
                    type="json_schema", json_schema=json.dumps(SCHEMA)
                ),
            )
        ),
        metadata=meta,
    )
    assert last_seen(harness).sampling.structured_output.kind == (
        common_pb2.STRUCTURED_OUTPUT_KIND_JSON_SCHEMA
    )
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stub.CreateChatCompletion(
            gateway_pb2.CreateChatCompletionRequest(
                params=gateway_pb2.ChatCompletionParams(
                    model=harness.model,
                    messages=[gateway_pb2.ChatMessage(role="user", content="x")],
                    tools=[tool],
                    tool_choice=gateway_pb2.ToolChoice(function_name="nope"),
                )
            ),
            metadata=meta,
        )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    first = await stub.CreateResponse(
        gateway_pb2.CreateResponseRequest(
            params=gateway_pb2.ResponseParams(
                model=harness.model, input_text="hello", max_output_tokens=3
            )
        ),
        metadata=meta,
    )
    assert first.response.status == "incomplete" and first.response.output_text
    events = [
        e.type
        async for e in stub.StreamResponse(
            gateway_pb2.StreamResponseRequest(
                params=gateway_pb2.ResponseParams(
                    model=harness.model,
                    input_text="again",
                    previous_response_id=first.response.id,
                    max_output_tokens=3,
                )
            ),
            metadata=meta,
        )
    ]
    assert events[0] == "response.created" and events[-1] == "response.incomplete"
    got = await stub.GetResponse(
        gateway_pb2.GetResponseRequest(response_id=first.response.id), metadata=meta
    )
    assert got.response.id == first.response.id
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.GetResponse(
            gateway_pb2.GetResponseRequest(response_id=first.response.id),
            metadata=(("authorization", f"Bearer {other}"),),
        )
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    made = await stub.CreateCachedContext(
        gateway_pb2.CreateCachedContextRequest(
            model=harness.model, prompt="a cached prefix " * 10, ttl_seconds=30
        ),
        metadata=meta,
    )
    listed = await stub.ListCachedContexts(gateway_pb2.ListCachedContextsRequest(), metadata=meta)
    assert [c.id for c in listed.contexts] == [made.context.id]
    await stub.DeleteCachedContext(
        gateway_pb2.DeleteCachedContextRequest(context_id=made.context.id), metadata=meta
    )
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await stub.GetCachedContext(
            gateway_pb2.GetCachedContextRequest(context_id=made.context.id), metadata=meta
        )
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
