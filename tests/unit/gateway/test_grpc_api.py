"""The gateway's gRPC API: the same operations as HTTP, server streaming, auth in metadata."""

from __future__ import annotations

import grpc
import pytest

from deepserve.rpc.client import insecure_channel
from deepserve.rpc.errors import RETRY_AFTER_KEY
from deepserve.tenancy.tenants import TenantLimits
from deepserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.unit.gateway.conftest import GatewayHarness

pytestmark = pytest.mark.timeout(60)


def stub(h: GatewayHarness) -> gateway_pb2_grpc.GatewayServiceStub:
    return gateway_pb2_grpc.GatewayServiceStub(insecure_channel(h.grpc_address, traced=False))


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"), ("x-request-id", "grpc-req-1"))


async def test_unary_chat_completion(harness: GatewayHarness) -> None:
    _, key = await harness.new_key()
    messages = [{"role": "user", "content": "hi grpc"}]
    call = stub(harness).CreateChatCompletion(
        gateway_pb2.CreateChatCompletionRequest(
            params=gateway_pb2.ChatCompletionParams(
                model=harness.model,
                messages=[gateway_pb2.ChatMessage(role="user", content="hi grpc")],
                options=gateway_pb2.GenerationOptions(
                    sampling=common_pb2.SamplingParams(max_tokens=4, logprobs=True, top_logprobs=1),
                    n=2,
                ),
            )
        ),
        metadata=auth(key),
    )
    reply = await call
    assert dict(await call.initial_metadata())["x-request-id"] == "grpc-req-1"
    ids = harness.tokenizer.encode_chat(messages)
    assert reply.id == "chatcmpl-grpc-req-1"
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].text == harness.tokenizer.decode(ids[:4])
    assert reply.choices[0].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert len(reply.choices[0].logprobs) == 4
    assert len(reply.choices[0].logprobs[0].top) == 1
    assert reply.usage.completion_tokens == 8
    assert reply.usage.prompt_tokens == len(ids)


async def test_streamed_completion_ends_with_usage(harness: GatewayHarness) -> None:
    _, key = await harness.new_key()
    prompt = "stream over grpc please"
    replies = [
        r
        async for r in stub(harness).StreamCompletion(
            gateway_pb2.StreamCompletionRequest(
                params=gateway_pb2.CompletionParams(
                    model=harness.model,
                    prompt=prompt,
                    options=gateway_pb2.GenerationOptions(
                        sampling=common_pb2.SamplingParams(max_tokens=50)
                    ),
                )
            ),
            metadata=auth(key),
        )
    ]
    text = "".join(c.text for r in replies for c in r.choices)
    assert text == prompt
    assert replies[-1].usage.completion_tokens == len(harness.tokenizer.encode(prompt))
    assert replies[-2].choices[0].finish_reason == common_pb2.FINISH_REASON_STOP


async def test_grpc_errors_carry_status_codes(harness: GatewayHarness) -> None:
    request = gateway_pb2.CreateCompletionRequest(
        params=gateway_pb2.CompletionParams(model=harness.model, prompt="x")
    )
    with pytest.raises(grpc.aio.AioRpcError) as unauth:
        await stub(harness).CreateCompletion(request, metadata=auth("ds-wrong"))
    assert unauth.value.code() == grpc.StatusCode.UNAUTHENTICATED

    _, key = await harness.new_key(TenantLimits(requests_per_min=1))
    await stub(harness).CreateCompletion(request, metadata=auth(key))
    with pytest.raises(grpc.aio.AioRpcError) as limited:
        await stub(harness).CreateCompletion(request, metadata=auth(key))
    assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert float(dict(limited.value.trailing_metadata())[RETRY_AFTER_KEY]) >= 1

    _, key2 = await harness.new_key()
    bad = gateway_pb2.CreateCompletionRequest(
        params=gateway_pb2.CompletionParams(
            model=harness.model,
            prompt="x",
            options=gateway_pb2.GenerationOptions(
                sampling=common_pb2.SamplingParams(temperature=7)
            ),
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await stub(harness).CreateCompletion(bad, metadata=auth(key2))
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature" in (invalid.value.details() or "")


async def test_list_models(harness: GatewayHarness) -> None:
    _, key = await harness.new_key()
    reply = await stub(harness).ListModels(gateway_pb2.ListModelsRequest(), metadata=auth(key))
    assert harness.model in [m.id for m in reply.models]
