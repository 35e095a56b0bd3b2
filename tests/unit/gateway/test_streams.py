"""Streams under load and under failure: 50 at once, an engine that dies, one that is gone."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import openai
import pytest
import pytest_asyncio

from deepserve import records
from deepserve.processes import free_port
from deepserve.records import InstanceRecord, Role
from deepserve.v1 import common_pb2
from tests.unit.gateway.conftest import GatewayHarness
from tests.unit.gateway.fake_engine import EchoBehaviour, EchoEngine

pytestmark = pytest.mark.timeout(60)

WORDS = "apple river stone cloud maple violet amber canyon harbor pepper".split()


def client(h: GatewayHarness, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{h.http_url}/v1", api_key=key, max_retries=0)


@pytest_asyncio.fixture
async def extra_model(harness: GatewayHarness) -> AsyncIterator[tuple[str, list[str]]]:
    """A second model name whose instances a test adds; cleaned up after."""
    model = f"extra-{uuid.uuid4().hex[:6]}"
    harness.gateway.tokenizers.put(model, harness.tokenizer)
    added: list[str] = []
    yield model, added
    for instance_id in added:
        await records.instances(harness.etcd).delete(instance_id)


async def add_instance(
    h: GatewayHarness, model: str, address: str, added: list[str]
) -> common_pb2.Instance:
    instance_id = f"inst-{uuid.uuid4().hex[:8]}"
    await records.instances(h.etcd).put(
        instance_id,
        InstanceRecord(
            instance_id=instance_id, model=model, role=Role.COLOCATED, address=address, pod_id="p"
        ),
    )
    added.append(instance_id)
    assert await h.gateway.models.instances.wait_for(lambda items: instance_id in items, 30)
    instance = common_pb2.Instance(instance_id=instance_id, model=model, address=address)
    h.scheduler.add(instance)
    return instance


async def test_fifty_concurrent_streams_get_exactly_their_own_tokens(
    harness: GatewayHarness,
) -> None:
    harness.engine.behaviour = EchoBehaviour(token_delay_s=0.002)
    _, key = await harness.new_key()
    c = client(harness, key)
    prompts = [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(3 + i % 7)) for i in range(50)]
    prompts = [f"{i}: {p}" for i, p in enumerate(prompts)]

    async def one(prompt: str) -> tuple[str, list[int], set[str], int]:
        stream = await c.completions.create(
            model=harness.model,
            prompt=prompt,
            max_tokens=64,
            stream=True,
            logprobs=0,
            stream_options={"include_usage": True},
        )
        text, ids, usage = "", [], -1
        chunk_ids: set[str] = set()
        async for chunk in stream:
            chunk_ids.add(chunk.id)
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            for choice in chunk.choices:
                text += choice.text
                if choice.logprobs is not None:
                    ids.extend(choice.logprobs.tokens)  # type: ignore[arg-type]
        return text, ids, chunk_ids, usage

    results = await asyncio.gather(*(one(p) for p in prompts))
    for prompt, (text, tokens, chunk_ids, usage) in zip(prompts, results, strict=True):
        expected = harness.tokenizer.encode(prompt)
        assert text == prompt  # nothing lost, duplicated or taken from another stream
        assert len(tokens) == len(expected) == usage
        assert len(chunk_ids) == 1
    assert len({next(iter(r[2])) for r in results}) == 50


async def test_engine_dying_mid_stream_ends_with_error_event(
    harness: GatewayHarness, extra_model: tuple[str, list[str]]
) -> None:
    model, added = extra_model
    doomed = EchoEngine(harness.tokenizer)
    doomed.behaviour = EchoBehaviour(die_after_tokens=3)
    await add_instance(harness, model, await doomed.start(), added)
    _, key = await harness.new_key()
    stream = await client(harness, key).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "tell me a long story"}], stream=True
    )
    got: list[str] = []
    with pytest.raises(openai.APIError) as err:
        async for chunk in stream:
            got.append(chunk.choices[0].delta.content or "")
    assert "mid-stream" in str(err.value.message)
    assert len(got) == 1 + 3  # the role chunk, then the three tokens before the engine died
    await doomed.stop()


async def test_dead_instance_before_first_token_is_routed_around(
    harness: GatewayHarness, extra_model: tuple[str, list[str]]
) -> None:
    model, added = extra_model
    dead = await add_instance(harness, model, f"127.0.0.1:{free_port()}", added)
    await add_instance(harness, model, harness.engine.address, added)
    _, key = await harness.new_key()
    before = len(harness.scheduler.requests)
    for _ in range(2):  # round-robin tries the dead one first at least once
        resp = await client(harness, key).completions.create(
            model=model, prompt="still here", max_tokens=10
        )
        assert resp.choices[0].text == "still here"
    routes = harness.scheduler.requests[before:]
    assert any(dead.instance_id in r.exclude_instance_ids for r in routes)
