"""The OpenAI HTTP API through the official `openai` client, in front of the echo engine."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.unit.gateway.conftest import GatewayHarness

pytestmark = pytest.mark.timeout(60)


def client(h: GatewayHarness, key: str, **kw: object) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{h.http_url}/v1", api_key=key, max_retries=0, **kw)


async def test_completion_echoes_prompt_with_usage(harness: GatewayHarness) -> None:
    _, key = await harness.new_key()
    prompt = "The quick brown fox jumps over the lazy dog"
    resp = await client(harness, key).completions.create(
        model=harness.model, prompt=prompt, max_tokens=100
    )
    ids = harness.tokenizer.encode(prompt)
    assert resp.choices[0].text == prompt
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == len(ids)
    assert resp.usage.completion_tokens == len(ids)
    assert resp.usage.total_tokens == 2 * len(ids)
    assert resp.id.startswith("cmpl-")


async def test_chat_applies_template_once_and_sends_token_ids(harness: GatewayHarness) -> None:
    _, key = await harness.new_key()
    messages = [{"role": "user", "content": "Hello there"}]
    resp = await client(harness, key).chat.completions.create(
        model=harness.model, messages=messages, max_tokens=5
    )
    expected_ids = harness.tokenizer.encode_chat(messages)
    seen = harness.engine.record.seen[-1]
    assert list(seen.prompt_token_ids) == expected_ids
    assert seen.detokenize is True
    assert seen.sampling.max_tokens == 5
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == harness.tokenizer.decode(expected_ids[:5])
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 5


async def test_streaming_chat_with_usage_chunk(harness: GatewayHarness) -> None:
    _, key = await harness.new_key()
    messages = [{"role": "user", "content": "stream me"}]
    stream = await client(harness, key).chat.completions.create(
        model=harness.model,
        messages=messages,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage, roles = "", None, None, []
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        choice = chunk.choices[0]
        if choice.delta.role:
            roles.append(choice.delta.role)
        text += choice.delta.content or ""
        finish = choice.finish_reason or finish
    ids = harness.tokenizer.encode_chat(messages)
    assert roles == ["assistant"]
    assert text == harness.tokenizer.decode(ids[:6])
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 6
    assert usage.prompt_tokens == len(ids)


async def test_n_fans_out_with_distinct_seeds(harness: GatewayHarness) -> None:
    _, key = await harness.new_key()
    before = len(harness.engine.record.seen)
    resp = await client(harness, key).completions.create(
        model=harness.model, prompt="one two three", max_tokens=2, n=3, seed=7
    )
    seen = harness.engine.record.seen[before:]
    assert sorted(s.sampling.seed for s in seen) == [7, 8, 9]
    assert len({s.request_id for s in seen}) == 3
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == len(harness.tokenizer.encode("one two three"))
    assert resp.usage.completion_tokens == 6


async def test_prompt_list_and_token_ids(harness: GatewayHarness) -> None:
    _, key = await harness.new_key()
    ids = harness.tokenizer.encode("alpha beta")
    resp = await client(harness, key).completions.create(
        model=harness.model, prompt=["gamma delta", "epsilon"], max_tokens=50, n=2
    )
    texts = [c.text for c in sorted(resp.choices, key=lambda c: c.index)]
    assert texts == ["gamma delta", "gamma delta", "epsilon", "epsilon"]
    resp = await client(harness, key).completions.create(
        model=harness.model, prompt=ids, max_tokens=50, echo=True
    )
    assert resp.choices[0].text == "alpha beta" * 2


async def test_logprobs_chat_and_completion(harness: GatewayHarness) -> None:
    _, key = await harness.new_key()
    resp = await client(harness, key).chat.completions.create(
        model=harness.model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == 3
    assert all(len(entry.top_logprobs) == 2 for entry in content)
    assert "".join(entry.token for entry in content) == resp.choices[0].message.content
    resp2 = await client(harness, key).completions.create(
        model=harness.model, prompt="hello world again", max_tokens=3, logprobs=1
    )
    lp = resp2.choices[0].logprobs
    assert lp.token_logprobs == [-0.5, -0.5, -0.5]
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == resp2.choices[0].text


async def test_sampling_parameters_reach_the_engine(harness: GatewayHarness) -> None:
    _, key = await harness.new_key()
    await client(harness, key).chat.completions.create(
        model=harness.model,
        messages=[{"role": "user", "content": "x"}],
        max_completion_tokens=4,
        temperature=0.3,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        stop=["zzz", "yyy"],
        seed=11,
        user="end-user-1",
    )
    s = harness.engine.record.seen[-1].sampling
    assert s.max_tokens == 4
    assert s.temperature == pytest.approx(0.3)
    assert s.top_p == pytest.approx(0.9)
    assert s.presence_penalty == pytest.approx(0.5)
    assert s.frequency_penalty == pytest.approx(-0.5)
    assert list(s.stop) == ["zzz", "yyy"]
    assert s.seed == 11


async def test_models_endpoints(harness: GatewayHarness) -> None:
    _, key = await harness.new_key()
    c = client(harness, key)
    listed = [m.id async for m in c.models.list()]
    assert harness.model in listed
    model = await c.models.retrieve(harness.model)
    assert model.id == harness.model
    with pytest.raises(openai.NotFoundError):
        await c.models.retrieve("no-such-model")


async def test_request_id_on_every_response(harness: GatewayHarness) -> None:
    _, key = await harness.new_key()
    async with httpx.AsyncClient(base_url=harness.http_url) as http:
        ok = await http.post(
            "/v1/completions",
            json={"model": harness.model, "prompt": "a b", "max_tokens": 1},
            headers={"authorization": f"Bearer {key}", "x-request-id": "my-req-1"},
        )
        assert ok.status_code == 200
        assert ok.headers["x-request-id"] == "my-req-1"
        assert ok.json()["id"] == "cmpl-my-req-1"
        bad = await http.post("/v1/completions", json={})
        assert bad.status_code == 401
        assert len(bad.headers["x-request-id"]) == 32
        odd = await http.get("/v1/models", headers={"x-request-id": b"bad id\xe9"})
        assert odd.status_code == 401
        assert len(odd.headers["x-request-id"]) == 32
