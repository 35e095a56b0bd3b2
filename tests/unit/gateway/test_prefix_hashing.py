"""The gateway hashes prompts for routing with the block size the model's engines register
(their instance records), never a setting of its own."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator

import openai
import pytest
import pytest_asyncio

from deepserve import records
from deepserve.completions.prepare import cache_salt_for, prefix_block_size
from deepserve.prefix_hash import prompt_block_hashes
from deepserve.records import InstanceRecord, Role
from deepserve.v1 import common_pb2, scheduler_pb2
from tests.unit.gateway.conftest import BLOCK_SIZE, GatewayHarness

pytestmark = pytest.mark.timeout(60)

PROMPT = list(range(100, 140))  # 40 token ids: five blocks of 8, two of 16


def record(instance_id: str, model: str, block_size: int, address: str = "x:1") -> InstanceRecord:
    return InstanceRecord(
        instance_id=instance_id,
        model=model,
        role=Role.COLOCATED,
        address=address,
        pod_id="p",
        block_size=block_size,
    )


@pytest_asyncio.fixture
async def engines(harness: GatewayHarness) -> AsyncIterator[list[str]]:
    """Instance ids a test registers (all on the harness's engine); removed after."""
    added: list[str] = []
    yield added
    for instance_id in added:
        await records.instances(harness.etcd).delete(instance_id)


async def serve_model(
    h: GatewayHarness, added: list[str], block_sizes: list[int]
) -> tuple[str, str]:
    """A new model with one instance per block size; returns (model, an API key)."""
    model = f"blocks-{uuid.uuid4().hex[:6]}"
    h.gateway.tokenizers.put(model, h.tokenizer)
    for block_size in block_sizes:
        instance_id = f"inst-{uuid.uuid4().hex[:8]}"
        address = h.engine.address
        await records.instances(h.etcd).put(
            instance_id, record(instance_id, model, block_size, address)
        )
        added.append(instance_id)
        assert await h.gateway.models.instances.wait_for(
            lambda items, i=instance_id: i in items, 30
        )
        h.scheduler.add(
            common_pb2.Instance(
                instance_id=instance_id, model=model, address=address, block_size=block_size
            )
        )
    _, key = await h.new_key()
    return model, key


async def routed(h: GatewayHarness, model: str, key: str) -> scheduler_pb2.RouteRequest:
    client = openai.AsyncOpenAI(base_url=f"{h.http_url}/v1", api_key=key, max_retries=0)
    await client.completions.create(model=model, prompt=PROMPT, max_tokens=2)
    [request] = [r for r in h.scheduler.requests if r.model == model]
    return request


def salted(request: scheduler_pb2.RouteRequest, block_size: int) -> list[str]:
    """The prompt's hash chain under the routed request's tenant salt."""
    return prompt_block_hashes(PROMPT, block_size, cache_salt_for(request.tenant, None))


@pytest.mark.parametrize("block_size", [8, 16])
async def test_prompts_are_hashed_with_the_block_size_of_the_models_engines(
    harness: GatewayHarness, engines: list[str], block_size: int
) -> None:
    model, key = await serve_model(harness, engines, [block_size])
    request = await routed(harness, model, key)
    assert request.block_size == block_size
    assert list(request.prefix_block_hashes) == salted(request, block_size)
    assert len(request.prefix_block_hashes) == len(PROMPT) // block_size


async def test_engines_that_disagree_are_hashed_for_with_the_most_common_size(
    harness: GatewayHarness, engines: list[str]
) -> None:
    model, key = await serve_model(harness, engines, [16, 8, 8])
    request = await routed(harness, model, key)
    assert request.block_size == 8
    assert list(request.prefix_block_hashes) == salted(request, 8)


async def test_engines_of_unknown_block_size_get_no_hashes(
    harness: GatewayHarness, engines: list[str]
) -> None:
    model, key = await serve_model(harness, engines, [0])
    request = await routed(harness, model, key)
    assert (request.block_size, list(request.prefix_block_hashes)) == (0, [])


async def test_the_harness_engine_is_hashed_for_with_its_registered_size(
    harness: GatewayHarness,
) -> None:
    _, key = await harness.new_key()
    before = len(harness.scheduler.requests)
    client = openai.AsyncOpenAI(base_url=f"{harness.http_url}/v1", api_key=key, max_retries=0)
    await client.completions.create(model=harness.model, prompt=PROMPT, max_tokens=2)
    [request] = harness.scheduler.requests[before:]
    assert request.block_size == BLOCK_SIZE
    assert len(request.prefix_block_hashes) == len(PROMPT) // BLOCK_SIZE


def test_block_size_choice_over_instance_records(caplog: pytest.LogCaptureFixture) -> None:
    model = f"choice-{uuid.uuid4().hex[:6]}"
    assert prefix_block_size(model, []) == 0
    assert prefix_block_size(model, [record("a", model, 0)]) == 0
    assert prefix_block_size(model, [record("a", model, 32), record("b", "other", 8)]) == 32
    with caplog.at_level(logging.WARNING, logger="deepserve.completions.prepare"):
        mixed = [record("a", model, 16), record("b", model, 8)]
        assert prefix_block_size(model, mixed) == 8  # a tie: the smaller
        assert prefix_block_size(model, mixed) == 8
        assert prefix_block_size(model, [*mixed, record("c", model, 16)]) == 16
    disagreements = [r for r in caplog.records if model in r.getMessage()]
    assert len(disagreements) == 1  # logged once for the same disagreement
