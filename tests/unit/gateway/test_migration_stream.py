"""An engine dying mid-stream behind the gateway: the client's SSE stream goes on unbroken.

The in-process gateway (real HTTP and gRPC servers) routes through the static scheduler to two
echo engines behind real gRPC servers; one stops its server after three tokens, as a killed
instance does. The request migrates to the other, which continues the echo from the tokens it
is given, so the client must see exactly the prompt's text once, with exact usage.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import openai
import pytest
import pytest_asyncio

from deepserve import records
from deepserve.completions.migration import MIGRATIONS
from deepserve.records import InstanceRecord, Role
from deepserve.v1 import common_pb2
from tests.unit.gateway.conftest import GatewayHarness
from tests.unit.gateway.fake_engine import EchoBehaviour, EchoEngine

pytestmark = pytest.mark.timeout(60)


@pytest_asyncio.fixture
async def doomed_pair(harness: GatewayHarness) -> AsyncIterator[tuple[str, EchoEngine, str]]:
    """A model served by an engine that dies after 3 tokens and by the harness's echo engine."""
    model = f"mig-{uuid.uuid4().hex[:6]}"
    harness.gateway.tokenizers.put(model, harness.tokenizer)
    doomed = EchoEngine(harness.tokenizer)
    doomed.behaviour = EchoBehaviour(die_after_tokens=3)
    added = []
    for address in (await doomed.start(), harness.engine.address):
        instance_id = f"inst-{uuid.uuid4().hex[:8]}"
        await records.instances(harness.etcd).put(
            instance_id,
            InstanceRecord(
                instance_id=instance_id,
                model=model,
                role=Role.COLOCATED,
                address=address,
                pod_id="p",
            ),
        )
        added.append(instance_id)
        assert await harness.gateway.models.instances.wait_for(
            lambda i, iid=instance_id: iid in i, 30
        )
        harness.scheduler.add(
            common_pb2.Instance(instance_id=instance_id, model=model, address=address)
        )
    yield model, doomed, added[0]
    await doomed.stop()
    for instance_id in added:
        await records.instances(harness.etcd).delete(instance_id)


async def test_stream_survives_its_engine_dying(
    harness: GatewayHarness, doomed_pair: tuple[str, EchoEngine, str]
) -> None:
    model, doomed, doomed_id = doomed_pair
    harness.engine.behaviour = EchoBehaviour()
    _, key = await harness.new_key()
    client = openai.AsyncOpenAI(base_url=f"{harness.http_url}/v1", api_key=key, max_retries=0)
    before = MIGRATIONS.labels(model, "migrated")._value.get()
    harness.scheduler._turn = 1  # round robin: the next pick is the doomed engine (added first)
    prompt = "one two three four five six seven eight"
    stream = await client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finish = "", None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.text
            finish = choice.finish_reason or finish
    expected = harness.tokenizer.encode(prompt)
    assert [r.request_id for r in doomed.record.seen] != []  # it did start on the doomed one
    assert text == prompt  # every token's text once: none lost, none repeated
    assert finish == "stop"
    assert usage is not None
    assert usage.prompt_tokens == len(expected)
    assert usage.completion_tokens == len(expected)
    assert MIGRATIONS.labels(model, "migrated")._value.get() == before + 1
    resumed = harness.engine.record.seen[-1]
    assert list(resumed.output_token_ids) == expected[:3]
    assert any(r.instance_id == doomed_id for r in harness.scheduler.failure_reports)
