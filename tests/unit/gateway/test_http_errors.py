"""Errors as OpenAI error objects with OpenAI's status codes, limits, and request lifecycle."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import httpx
import openai
import pytest

from deepserve import records
from deepserve.records import ModelRecord
from deepserve.tenancy.tenants import TenantLimits
from deepserve.tenancy.usage import UsageMeter
from tests.unit.gateway.conftest import GatewayHarness
from tests.unit.gateway.fake_engine import EchoBehaviour

pytestmark = pytest.mark.timeout(60)


def client(h: GatewayHarness, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{h.http_url}/v1", api_key=key, max_retries=0)


async def post(h: GatewayHarness, key: str, path: str, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=h.http_url, timeout=30) as http:
        return await http.post(path, json=body, headers={"authorization": f"Bearer {key}"})


@pytest.fixture(autouse=True)
def reset_engine(harness: GatewayHarness) -> None:
    harness.engine.behaviour = EchoBehaviour()


async def test_missing_and_wrong_keys_are_401(harness: GatewayHarness) -> None:
    with pytest.raises(openai.AuthenticationError) as wrong:
        await client(harness, "ds-not-a-key").models.list()
    assert wrong.value.status_code == 401
    assert wrong.value.body["type"] == "authentication_error"  # type: ignore[index]
    async with httpx.AsyncClient(base_url=harness.http_url) as http:
        missing = await http.post("/v1/chat/completions", json={"model": harness.model})
    assert missing.status_code == 401
    assert "Bearer" in missing.json()["error"]["message"]


async def test_unknown_model_is_404(harness: GatewayHarness) -> None:
    _, key = await harness.new_key()
    with pytest.raises(openai.NotFoundError) as err:
        await client(harness, key).chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "x"}]
        )
    assert err.value.code == "model_not_found"
    assert err.value.param == "model"


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"content": "no role"}]}, "messages.0.role"),
        ({"stream": {"x": 1}}, "stream"),
        ({"temperature": 3.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"presence_penalty": -9}, "presence_penalty"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"seed": 2**70}, "seed"),
        ({"stop_token_ids": [10**9]}, "stop_token_ids"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x" * 4000}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ],
)
async def test_bad_requests_are_400_naming_the_field(
    harness: GatewayHarness, patch: dict[str, Any], param: str
) -> None:
    _, key = await harness.new_key()
    body = {"model": harness.model, "messages": [{"role": "user", "content": "hi"}], **patch}
    resp = await post(harness, key, "/v1/chat/completions", body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert set(error) == {"message", "type", "param", "code"}


async def test_unknown_fields_are_ignored(harness: GatewayHarness) -> None:
    _, key = await harness.new_key()
    body = {
        "model": harness.model,
        "prompt": "a b c",
        "max_tokens": 2,
        "frobnicate": True,
        "response_format": {"type": "text"},
    }
    resp = await post(harness, key, "/v1/completions", body)
    assert resp.status_code == 200, resp.text


async def test_rate_limit_requests_per_min_is_429_with_retry_after(
    harness: GatewayHarness,
) -> None:
    tenant, key = await harness.new_key(TenantLimits(requests_per_min=2))
    body = {"model": harness.model, "prompt": "a b", "max_tokens": 1}
    statuses = [(await post(harness, key, "/v1/completions", body)) for _ in range(4)]
    assert [r.status_code for r in statuses] == [200, 200, 429, 429]
    refused = statuses[2]
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    with pytest.raises(openai.RateLimitError):
        await client(harness, key).completions.create(model=harness.model, prompt="a", max_tokens=1)
    usage = await UsageMeter(harness.redis.client).read(tenant)
    assert [(u.model, u.requests) for u in usage] == [(harness.model, 2)]


async def test_tokens_per_min_counts_prompt_and_max_tokens(harness: GatewayHarness) -> None:
    _, key = await harness.new_key(TenantLimits(tokens_per_min=40))
    body = {"model": harness.model, "prompt": "a b c d", "max_tokens": 20}
    first = await post(harness, key, "/v1/completions", body)
    assert first.status_code == 200
    # The first was charged its real size (4 + 4 tokens), so 8 + 24 fits in 40 ...
    second = await post(harness, key, "/v1/completions", body)
    assert second.status_code == 200
    # ... but a third does not, and one bigger than the whole budget never fits.
    third = await post(harness, key, "/v1/completions", {**body, "max_tokens": 30})
    assert third.status_code == 429
    too_big = await post(harness, key, "/v1/completions", {**body, "max_tokens": 100})
    assert too_big.status_code == 429
    assert "lower max_tokens" in too_big.json()["error"]["message"]


async def test_concurrency_limit_and_slot_release(harness: GatewayHarness) -> None:
    _, key = await harness.new_key(TenantLimits(max_concurrent=1))
    harness.engine.behaviour.token_delay_s = 0.05
    body = {"model": harness.model, "prompt": "one two three four", "max_tokens": 4}
    seen = len(harness.engine.record.seen)
    first = asyncio.create_task(post(harness, key, "/v1/completions", body))
    for _ in range(3000):  # once the engine sees it, the first holds the slot
        if len(harness.engine.record.seen) > seen:
            break
        await asyncio.sleep(0.01)
    second = await post(harness, key, "/v1/completions", body)
    assert second.status_code == 429
    assert (await first).status_code == 200
    third = await post(harness, key, "/v1/completions", body)
    assert third.status_code == 200


async def test_no_serving_instance_is_503(harness: GatewayHarness) -> None:
    _, key = await harness.new_key()
    model = "registered-but-idle"
    harness.gateway.tokenizers.put(model, harness.tokenizer)
    await records.models(harness.etcd).put(model, ModelRecord(model_id=model))
    try:
        assert await harness.gateway.models.registered.wait_for(lambda m: model in m, 30)
        resp = await post(harness, key, "/v1/completions", {"model": model, "prompt": "x"})
        assert resp.status_code == 503
        assert resp.headers["retry-after"]
    finally:
        await records.models(harness.etcd).delete(model)


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (grpc.StatusCode.INTERNAL, 500),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (grpc.StatusCode.INVALID_ARGUMENT, 400),
    ],
)
async def test_engine_refusals_map_to_status(
    harness: GatewayHarness, code: grpc.StatusCode, status: int
) -> None:
    _, key = await harness.new_key()
    harness.engine.behaviour.refuse_with = code
    resp = await post(harness, key, "/v1/completions", {"model": harness.model, "prompt": "x"})
    assert resp.status_code == status
    assert "error" in resp.json()


async def test_engine_error_mid_stream_ends_with_error_event(harness: GatewayHarness) -> None:
    _, key = await harness.new_key()
    harness.engine.behaviour.error_after_tokens = 2
    stream = await client(harness, key).completions.create(
        model=harness.model, prompt="one two three four five", max_tokens=5, stream=True
    )
    received = []
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            received.append(chunk.choices[0].text)
    assert len(received) == 2


async def _assert_times_out(harness: GatewayHarness, timeout_s: float) -> None:
    """A completion under a request time limit of timeout_s ends in 504, "ran past"."""
    _, key = await harness.new_key()
    saved = harness.gateway.settings.request_timeout_s
    harness.gateway.settings.request_timeout_s = timeout_s
    try:
        resp = await post(
            harness, key, "/v1/completions", {"model": harness.model, "prompt": "a b c d e f"}
        )
        assert resp.status_code == 504
        assert resp.json()["error"]["message"].startswith("the request ran past")
    finally:
        harness.gateway.settings.request_timeout_s = saved


async def test_request_timeout_ends_the_request(harness: GatewayHarness) -> None:
    harness.engine.behaviour.token_delay_s = 0.3
    await _assert_times_out(harness, 0.5)


async def test_request_timeout_while_routing_is_a_timeout_not_an_outage(
    harness: GatewayHarness,
) -> None:
    # The request's time runs out inside Route: 504 (its limit), not 503 (scheduler down).
    harness.scheduler.route_delay_s = 1.0
    try:
        await _assert_times_out(harness, 0.3)
    finally:
        harness.scheduler.route_delay_s = 0.0


async def _wait_cancelled(harness: GatewayHarness, request_id: str) -> None:
    for _ in range(1000):
        if f"{request_id}-0" in harness.engine.record.cancelled:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine request {request_id}-0 was never cancelled")


async def test_client_disconnect_mid_stream_aborts_engine_request(harness: GatewayHarness) -> None:
    _, key = await harness.new_key(TenantLimits(max_concurrent=1))
    harness.engine.behaviour.token_delay_s = 0.2
    body = {"model": harness.model, "prompt": "a b c d e f g h", "stream": True}
    async with httpx.AsyncClient(base_url=harness.http_url, timeout=30) as http:
        headers = {"authorization": f"Bearer {key}", "x-request-id": "leaver-1"}
        async with http.stream("POST", "/v1/completions", json=body, headers=headers) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    break  # one token in, then hang up
    await _wait_cancelled(harness, "leaver-1")
    assert "leaver-1-0" not in harness.engine.record.finished
    # The concurrency slot came back with the abort.
    harness.engine.behaviour.token_delay_s = 0
    resp2 = await post(harness, key, "/v1/completions", {"model": harness.model, "prompt": "x"})
    assert resp2.status_code == 200


async def test_client_disconnect_before_response_aborts_engine_request(
    harness: GatewayHarness,
) -> None:
    _, key = await harness.new_key()
    harness.engine.behaviour.token_delay_s = 0.2
    body = {"model": harness.model, "prompt": "a b c d e f g h i j"}

    async def give_up() -> None:
        async with httpx.AsyncClient(base_url=harness.http_url, timeout=0.5) as http:
            headers = {"authorization": f"Bearer {key}", "x-request-id": "leaver-2"}
            await http.post("/v1/completions", json=body, headers=headers)

    with pytest.raises(httpx.ReadTimeout):
        await give_up()
    await _wait_cancelled(harness, "leaver-2")
