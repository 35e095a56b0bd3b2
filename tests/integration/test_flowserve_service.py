"""FlowServeService over gRPC. Starts real processes: etcd, valkey-server and one flowserve pod
(`python -m deepserve.flowserve`) serving a tiny random Llama.

The tests share the pod; each asks for the state it needs (`warm_pod`: no model loaded,
`loaded_pod`: the tiny Llama loaded) and the fixture brings the pod there, so every test passes
alone and in any order."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from deepserve import records
from deepserve.flowserve.settings import FlowServeSettings
from deepserve.processes import bound_to_parent, free_port
from deepserve.rpc.client import insecure_channel
from deepserve.rpc.health_check import wait_serving
from deepserve.store.etcd import EtcdStore
from deepserve.store.redis_store import RedisStore
from deepserve.v1 import common_pb2, flowserve_pb2, flowserve_pb2_grpc
from tests.tiny_model import make_tiny_llama

pytestmark = pytest.mark.integration

MAX_QUEUE = 4


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="module")
def pod(
    etcd_endpoint: str, redis_url: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("pod") / "flowserve.log"
    env = {
        **os.environ,
        "DEEPSERVE_ETCD_ENDPOINT": etcd_endpoint,
        "DEEPSERVE_REDIS_URL": redis_url,
        "DEEPSERVE_LEASE_TTL_S": "2",
        "DEEPSERVE_FLOWSERVE_GRPC_PORT": str(port),
        "DEEPSERVE_FLOWSERVE_MAX_QUEUE_LEN": str(MAX_QUEUE),
        "DEEPSERVE_FLOWSERVE_MAX_NUM_SEQS": "2",
        "DEEPSERVE_FLOWSERVE_KV_CACHE_BLOCKS": "64",
        # The warm pod loads this model's tokenizer before it is asked to serve it.
        "DEEPSERVE_FLOWSERVE_PRELOAD_TOKENIZERS": str(tiny_model),
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            # Bound to this process: a killed test run takes it along.
            bound_to_parent([sys.executable, "-m", "deepserve.flowserve"]),
            env=env,
            stdout=out,
            stderr=out,
        )
    address = f"127.0.0.1:{port}"
    try:
        if not asyncio.run(wait_serving(address, 60)):
            pytest.fail(f"flowserve did not start:\n{log.read_text()}")
        yield address
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        # A clean stop revokes the lease: nothing of this pod is left in etcd.
        assert proc.returncode is not None


async def _stats(address: str) -> flowserve_pb2.GetStatsResponse:
    async with insecure_channel(address, traced=False) as channel:
        stub = flowserve_pb2_grpc.FlowServeServiceStub(channel)
        return await stub.GetStats(flowserve_pb2.GetStatsRequest(), timeout=10)


@pytest.fixture
async def warm_pod(pod: str) -> str:
    """The shared pod with no model loaded (unloaded first if a test loaded one)."""
    if (await _stats(pod)).ready:
        async with insecure_channel(pod, traced=False) as channel:
            stub = flowserve_pb2_grpc.FlowServeServiceStub(channel)
            await stub.UnloadModel(flowserve_pb2.UnloadModelRequest(), timeout=60)
    assert not (await _stats(pod)).ready
    return pod


@pytest.fixture
async def loaded_pod(pod: str, tiny_model: Path) -> str:
    """The shared pod serving the tiny Llama (loaded first if it is warm)."""
    if not (await _stats(pod)).ready:
        async with insecure_channel(pod, traced=False) as channel:
            stub = flowserve_pb2_grpc.FlowServeServiceStub(channel)
            await stub.LoadModel(
                flowserve_pb2.LoadModelRequest(
                    model=str(tiny_model), role=common_pb2.INSTANCE_ROLE_COLOCATED
                ),
                timeout=120,
            )
    stats = await _stats(pod)
    assert stats.ready and stats.model == str(tiny_model)
    return pod


def stub_for(address: str) -> tuple[grpc.aio.Channel, flowserve_pb2_grpc.FlowServeServiceStub]:
    channel = insecure_channel(address, traced=False)
    return channel, flowserve_pb2_grpc.FlowServeServiceStub(channel)


def greedy(max_tokens: int, **kw: object) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


async def collect(stub, request) -> list[flowserve_pb2.GenerateResponse]:  # type: ignore[no-untyped-def]
    return [reply async for reply in stub.Generate(request, timeout=60)]


async def test_warm_pod_rejects_generate_until_loaded(warm_pod: str, tiny_model: Path) -> None:
    channel, stub = stub_for(warm_pod)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(
                stub,
                flowserve_pb2.GenerateRequest(
                    request_id="r0", prompt_token_ids=[5, 6], sampling=greedy(2)
                ),
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        loaded = await stub.LoadModel(
            flowserve_pb2.LoadModelRequest(
                model=str(tiny_model), role=common_pb2.INSTANCE_ROLE_COLOCATED
            )
        )
        assert loaded.instance_id
        weights_step = [s for s in loaded.steps if s.step == "weights_loaded"]
        assert weights_step and "tokenizer preloaded" in weights_step[0].detail, loaded.steps
        stats = await stub.GetStats(flowserve_pb2.GetStatsRequest())
        assert stats.ready and stats.model == str(tiny_model)
        assert stats.instance_id == loaded.instance_id


async def test_generate_streams_tokens_text_and_usage(loaded_pod: str, tiny_model: Path) -> None:
    channel, stub = stub_for(loaded_pod)
    async with channel:
        replies = await collect(
            stub,
            flowserve_pb2.GenerateRequest(
                request_id="r1",
                model=str(tiny_model),
                prompt_token_ids=[10, 20, 30, 40, 50],
                sampling=greedy(12, logprobs=True, top_logprobs=3),
            ),
        )
    tokens = [t for r in replies for t in r.token_ids]
    assert len(tokens) == 12
    last = replies[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (5, 12)
    logprobs = [lp for r in replies for lp in r.logprobs]
    assert len(logprobs) == 12
    for lp, token in zip(logprobs, tokens, strict=True):
        assert lp.chosen.token_id == token
        assert len(lp.top) == 3 and lp.top[0].logprob >= lp.top[-1].logprob
        assert lp.chosen.logprob <= 0.0


async def test_same_prompt_twice_hits_the_prefix_cache_with_identical_tokens(
    loaded_pod: str, tiny_model: Path
) -> None:
    prompt = list(range(3, 3 + 40))  # more than two full 16-token blocks
    channel, stub = stub_for(loaded_pod)
    async with channel:
        runs = []
        for rid in ("p1", "p2"):
            replies = await collect(
                stub,
                flowserve_pb2.GenerateRequest(
                    request_id=rid, prompt_token_ids=prompt, sampling=greedy(8)
                ),
            )
            runs.append(replies)
    first, second = ([t for r in run for t in r.token_ids] for run in runs)
    assert first == second
    assert runs[1][-1].usage.cached_tokens >= 32


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        (common_pb2.SamplingParams(temperature=3.0, max_tokens=4), "temperature"),
        (common_pb2.SamplingParams(top_p=1.5, max_tokens=4), "top_p"),
        (common_pb2.SamplingParams(presence_penalty=-5, max_tokens=4), "presence_penalty"),
        (common_pb2.SamplingParams(max_tokens=100_000), "max_tokens"),
        (common_pb2.SamplingParams(top_logprobs=50, logprobs=True, max_tokens=4), "top_logprobs"),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    loaded_pod: str, tiny_model: Path, sampling: common_pb2.SamplingParams, field: str
) -> None:
    channel, stub = stub_for(loaded_pod)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(
                stub,
                flowserve_pb2.GenerateRequest(
                    request_id=f"bad-{field}", prompt_token_ids=[1, 2, 3], sampling=sampling
                ),
            )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (err.value.details() or "")


async def test_unknown_model_and_bad_tokens_are_invalid_argument(
    loaded_pod: str, tiny_model: Path
) -> None:
    channel, stub = stub_for(loaded_pod)
    async with channel:
        for request, field in (
            (
                flowserve_pb2.GenerateRequest(
                    request_id="m", model="no-such-model", prompt_token_ids=[1], sampling=greedy(2)
                ),
                "model",
            ),
            (
                flowserve_pb2.GenerateRequest(
                    request_id="e", prompt_token_ids=[], sampling=greedy(2)
                ),
                "prompt",
            ),
            (
                flowserve_pb2.GenerateRequest(
                    request_id="v", prompt_token_ids=[1, 10**6], sampling=greedy(2)
                ),
                "prompt",
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub, request)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request.request_id
            assert field in (err.value.details() or ""), err.value.details()


async def test_full_queue_is_resource_exhausted_only_at_the_bound(
    loaded_pod: str, tiny_model: Path
) -> None:
    channel, stub = stub_for(loaded_pod)

    def call(i: int):  # type: ignore[no-untyped-def]
        return stub.Generate(
            flowserve_pb2.GenerateRequest(
                request_id=f"q{i}", prompt_token_ids=[7, 8, 9], sampling=greedy(100)
            ),
            timeout=120,
        )

    async def outcome(call) -> str:  # type: ignore[no-untyped-def]
        try:
            async for _ in call:
                pass
            return "ok"
        except grpc.aio.AioRpcError as exc:
            return exc.code().name

    async with channel:
        # Up to the bound, every request is accepted even when all arrive at once.
        within = await asyncio.gather(*(outcome(call(i)) for i in range(MAX_QUEUE)))
        assert within == ["ok"] * MAX_QUEUE
        # Far beyond it, some are turned away with RESOURCE_EXHAUSTED, and only those.
        beyond = await asyncio.gather(*(outcome(call(100 + i)) for i in range(3 * MAX_QUEUE + 2)))
    assert beyond.count("RESOURCE_EXHAUSTED") >= 1
    assert beyond.count("ok") >= MAX_QUEUE
    assert set(beyond) <= {"ok", "RESOURCE_EXHAUSTED"}


async def test_cancelled_stream_aborts_and_frees_blocks(loaded_pod: str, tiny_model: Path) -> None:
    channel, stub = stub_for(loaded_pod)
    async with channel:
        call = stub.Generate(
            flowserve_pb2.GenerateRequest(
                request_id="gone", prompt_token_ids=list(range(1, 30)), sampling=greedy(400)
            )
        )
        got = 0
        async for _ in call:
            got += 1
            if got == 3:
                break
        call.cancel()  # the client goes away mid-stream
        deadline = time.monotonic() + 10
        while True:
            stats = await stub.GetStats(flowserve_pb2.GetStatsRequest())
            if stats.running_requests == 0 and stats.kv_blocks_used == 0:
                break
            assert time.monotonic() < deadline, f"request still holds blocks: {stats}"
            await asyncio.sleep(0.05)
        abort = await stub.Abort(flowserve_pb2.AbortRequest(request_id="gone"))
        assert not abort.aborted  # already gone


async def test_load_reports_and_registration_are_visible(
    loaded_pod: str, tiny_model: Path, etcd_endpoint: str, redis_url: str
) -> None:
    channel, stub = stub_for(loaded_pod)
    async with channel:
        # A prompt of two full blocks no other test sends: the engine stores (and reports)
        # blocks of its own.
        await collect(
            stub,
            flowserve_pb2.GenerateRequest(
                request_id="reported", prompt_token_ids=[201, 203] * 16, sampling=greedy(2)
            ),
        )
        stats = await stub.GetStats(flowserve_pb2.GetStatsRequest())
    async with EtcdStore(etcd_endpoint) as etcd:
        found = await records.instances(etcd).get(stats.instance_id)
    assert found is not None and found.record.address == loaded_pod
    # The engine's own block size travels on the record: routers hash prompts with it.
    assert found.record.block_size == FlowServeSettings().block_size
    async with RedisStore(redis_url) as redis:
        deadline = time.monotonic() + 5
        while not (loads := await redis.read_loads([stats.instance_id])):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert loads[stats.instance_id].kv_blocks_total == 64
        deadline = time.monotonic() + 5
        while not any(
            e.event and e.event.kind == "stored" and e.event.hashes
            for e in await redis.read_kv_events(stats.instance_id)
        ):
            assert time.monotonic() < deadline, "no stored-blocks event reached Redis"
            await asyncio.sleep(0.1)
