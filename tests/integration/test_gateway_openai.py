"""The gateway of a real local cluster through the official `openai` client.

Starts real processes: `deepserve up` (etcd, valkey-server, scheduler, jobmgr, podpool,
gateway, a flowserve pod serving smollm2-135m) and a second gateway process (auth required)
sharing its stores, for the API-key and cross-replica rate-limit checks.

The tests share the cluster. One kills the engine: it waits for the deployment to replace it
before it ends, and every test that sends requests first waits (`url`) until the model's
registered engines all answer, so each test passes alone and in any order.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest

from deepserve import records
from deepserve.cli import tenancy as tenancy_cli
from deepserve.models.catalog import DEFAULT_MODEL
from deepserve.processes import ManagedProcess, free_port, wait_for_port
from deepserve.rpc.client import insecure_channel
from deepserve.store.etcd import EtcdStore
from deepserve.tenancy.api_keys import ApiKeys
from deepserve.tenancy.tenants import TenantLimits, Tenants
from deepserve.tokenizer import Tokenizer
from deepserve.v1 import (
    common_pb2,
    flowserve_pb2,
    flowserve_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
)
from tests.cluster_harness import RunningCluster, local_cluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MODEL = DEFAULT_MODEL
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _models(url: str, key: str = "EMPTY") -> list[str]:
    request = urllib.request.Request(f"{url}/v1/models", headers={"authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        return [m["id"] for m in json.load(resp)["data"]]


def _wait_listed(url: str, key: str = "EMPTY", timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if MODEL in _models(url, key):
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{MODEL} not listed by {url}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    with local_cluster(tmp_path_factory.mktemp("gw"), model=MODEL, timeout_s=240) as running:
        _wait_listed(running.layout.gateway_url)
        yield running


@pytest.fixture
def served(cluster: RunningCluster) -> RunningCluster:
    """The cluster once every registered engine of MODEL answers (a killed one was replaced)."""
    asyncio.run(_wait_engines_answer(cluster))
    return cluster


@pytest.fixture
def url(served: RunningCluster) -> str:
    return served.layout.gateway_url


@pytest.fixture(scope="module")
def second_gateway(cluster: RunningCluster) -> Iterator[str]:
    """Another gateway process on the same stores and scheduler, with API keys required."""
    lay = cluster.layout
    http_port = free_port()
    env = {
        **os.environ,
        "DEEPSERVE_ETCD_ENDPOINT": lay.etcd_endpoint,
        "DEEPSERVE_REDIS_URL": lay.redis_url,
        "DEEPSERVE_HOST": lay.host,
        "DEEPSERVE_GATEWAY_GRPC_PORT": str(free_port()),
        "DEEPSERVE_GATEWAY_HTTP_PORT": str(http_port),
        "DEEPSERVE_GATEWAY_SCHEDULER_ADDRESS": lay.address("scheduler"),
        "DEEPSERVE_GATEWAY_AUTH_OPEN": "false",
    }
    proc = ManagedProcess(
        "gateway-2",
        [sys.executable, "-m", "deepserve.gateway"],
        lay.log_dir / "gateway-2.log",
        env=env,
    ).start()
    try:
        assert wait_for_port(lay.host, http_port, 60), proc.tail()
        yield f"http://{lay.host}:{http_port}"
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_model_dir(default_model_dir)


async def _new_key(cluster: RunningCluster, limits: TenantLimits | None = None) -> tuple[str, str]:
    tenant = f"it-{uuid.uuid4().hex[:8]}"
    async with EtcdStore(cluster.layout.etcd_endpoint) as etcd:
        if limits is not None:
            await Tenants(etcd).set_limits(tenant, limits)
        key, _ = await ApiKeys(etcd).create(tenant)
    return tenant, key


def sync_client(url: str, key: str = "EMPTY") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def test_sync_chat_completion(url: str, tokenizer: Tokenizer) -> None:
    resp = sync_client(url).chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=20,
        temperature=0,  # type: ignore[arg-type]
    )
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in (choice.message.content or "")
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == len(tokenizer.encode_chat(QUESTION))
    assert 0 < resp.usage.completion_tokens <= 20


def test_streaming_matches_non_streaming(url: str) -> None:
    client = sync_client(url)
    whole = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=12,
        temperature=0,  # type: ignore[arg-type]
    )
    stream = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
    assert text == whole.choices[0].message.content
    assert usage is not None and whole.usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens


async def test_async_completions_with_n_and_stop(url: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0)
    resp = await client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=6, n=2, temperature=0.8, seed=3
    )
    assert sorted(c.index for c in resp.choices) == [0, 1]
    assert resp.usage is not None and resp.usage.completion_tokens <= 12
    stopped = await client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7"]
    )
    assert " 7" not in stopped.choices[0].text
    assert stopped.choices[0].finish_reason == "stop"


def test_error_cases(url: str, second_gateway: str) -> None:
    client = sync_client(url)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=QUESTION)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=9)  # type: ignore[arg-type]
    assert bad.value.param == "temperature"
    with pytest.raises(openai.AuthenticationError):
        sync_client(second_gateway, "ds-wrong").models.list()


async def test_fifty_concurrent_streams(url: str, tokenizer: Tokenizer) -> None:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0, timeout=120)

    async def one(i: int) -> tuple[str, str, list[str], int]:
        stream = await client.completions.create(
            model=MODEL,
            prompt=f"Item {i}: a short note about the number {i}.",
            max_tokens=8,
            temperature=0,
            logprobs=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        rid, text, tokens, used = "", "", [], -1
        async for chunk in stream:
            rid = rid or chunk.id
            assert chunk.id == rid  # never a chunk of another stream
            if chunk.usage is not None:
                used = chunk.usage.completion_tokens
            for choice in chunk.choices:
                text += choice.text
                if choice.logprobs is not None:
                    tokens.extend(choice.logprobs.tokens or [])
        return rid, text, tokens, used

    results = await asyncio.gather(*(one(i) for i in range(50)))
    assert len({r[0] for r in results}) == 50
    for _rid, text, tokens, used in results:
        # Each token arrived exactly once: the text is its tokens, and the count matches usage.
        assert used == len(tokens) > 0
        assert "".join(tokens) == text


async def test_rate_limit_holds_across_two_gateway_processes(
    cluster: RunningCluster, url: str, second_gateway: str
) -> None:
    _tenant, key = await _new_key(cluster, TenantLimits(requests_per_min=6))
    for gateway_url in (url, second_gateway):
        _wait_listed(gateway_url, key, timeout_s=30)  # the key reached both gateways' mirrors
    clients = [
        openai.AsyncOpenAI(base_url=f"{u}/v1", api_key=key, max_retries=0, timeout=120)
        for u in (url, second_gateway)
    ]

    async def attempt(i: int) -> int:
        try:
            await clients[i % 2].completions.create(model=MODEL, prompt="hi", max_tokens=1)
            return 200
        except openai.RateLimitError as exc:
            assert int(exc.response.headers["retry-after"]) >= 1
            return 429

    statuses = await asyncio.gather(*(attempt(i) for i in range(16)))
    assert statuses.count(200) == 6
    assert statuses.count(429) == 10


async def _engines(cluster: RunningCluster) -> list[tuple[str, str, int]]:
    """(instance id, address, pod process id) of each engine registered for MODEL."""
    async with EtcdStore(cluster.layout.etcd_endpoint) as etcd:
        found, _ = await records.instances(etcd).list()
        engines = []
        for v in found:
            if v.record.model == MODEL:
                pod = await records.pods(etcd).require(v.record.pod_id)
                engines.append((v.record.instance_id, v.record.address, pod.record.pid))
    return engines


async def _engine(cluster: RunningCluster) -> tuple[str, int]:
    """Address and process id of the engine serving MODEL."""
    _id, address, pid = (await _engines(cluster))[0]
    return address, pid


async def _answers(address: str) -> bool:
    try:
        await _engine_busy(address)
    except grpc.aio.AioRpcError:
        return False
    return True


async def _wait_engines_answer(cluster: RunningCluster, timeout_s: float = 180) -> set[str]:
    """Waits until MODEL has engines and every registered one answers (a killed engine's record
    lasts until its lease expires); returns their instance ids."""
    deadline = time.monotonic() + timeout_s
    while True:
        engines = await _engines(cluster)
        answering = [await _answers(address) for _id, address, _pid in engines]
        if engines and all(answering):
            return {instance_id for instance_id, _address, _pid in engines}
        assert time.monotonic() < deadline, f"no answering engine of {MODEL}: {engines}"
        await asyncio.sleep(0.25)


async def _engine_busy(address: str) -> int:
    async with insecure_channel(address, traced=False) as ch:
        stats = await flowserve_pb2_grpc.FlowServeServiceStub(ch).GetStats(
            flowserve_pb2.GetStatsRequest(), timeout=5
        )
    return stats.running_requests + stats.waiting_requests


async def test_client_disconnect_aborts_the_engine_request(
    cluster: RunningCluster, url: str
) -> None:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0)
    stream = await client.completions.create(
        model=MODEL,
        prompt="Write a very long story.",
        max_tokens=1500,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    address, _pid = await _engine(cluster)
    async for _chunk in stream:
        break
    assert await _engine_busy(address) == 1
    await stream.close()
    deadline = time.monotonic() + 10
    while await _engine_busy(address):
        assert time.monotonic() < deadline, "the engine kept generating for a departed client"
        await asyncio.sleep(0.05)


async def test_grpc_streamed_chat(served: RunningCluster) -> None:
    async with insecure_channel(served.layout.address("gateway"), traced=False) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        replies = [
            r
            async for r in stub.StreamChatCompletion(
                gateway_pb2.StreamChatCompletionRequest(
                    params=gateway_pb2.ChatCompletionParams(
                        model=MODEL,
                        messages=[gateway_pb2.ChatMessage(role="user", content="Say hi")],
                        options=gateway_pb2.GenerationOptions(
                            sampling=common_pb2.SamplingParams(max_tokens=5)
                        ),
                    )
                ),
                timeout=60,
            )
        ]
    assert "".join(c.text for r in replies for c in r.choices)
    assert 0 < replies[-1].usage.completion_tokens <= 5
    assert any(c.finish_reason for r in replies for c in r.choices)


def test_usage_cli_shows_accumulated_tokens(
    cluster: RunningCluster, url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # A tenant of its own (the open gateway bills a key's tenant): only these requests count.
    tenant, key = asyncio.run(_new_key(cluster))
    _wait_listed(url, key, timeout_s=30)  # the key reached the gateway's mirror
    client = sync_client(url, key)
    prompt = completion = 0
    for n in range(3):
        resp = client.completions.create(model=MODEL, prompt=f"Count to {n + 3}:", max_tokens=4)
        assert resp.usage is not None
        prompt += resp.usage.prompt_tokens
        completion += resp.usage.completion_tokens
    assert prompt > 0 and completion > 0

    def usage_line() -> tuple[int, ...] | None:
        assert tenancy_cli.main(["usage", "--run-dir", str(cluster.layout.run_dir)]) == 0
        out = capsys.readouterr().out
        line = next((line for line in out.splitlines() if line.startswith(tenant)), None)
        if line is None:
            return None
        assert line.split()[1] == MODEL
        return tuple(int(x) for x in line.split()[2:5])

    # Usage is added once each request finished, which may trail its response a little.
    deadline = time.monotonic() + 10
    while (found := usage_line()) != (3, prompt, completion):
        assert time.monotonic() < deadline, f"usage of {tenant}: {found}"
        time.sleep(0.2)


def test_engine_dying_mid_stream_ends_the_stream_with_an_error_or_finishes_it_elsewhere(
    cluster: RunningCluster, url: str
) -> None:
    """Never a hang and never a silently short answer. The deployment's replacement can come
    up (podpool sees the exit at once) while the gateway routes the request again; then the
    stream migrates to it and runs to its full length (issue #21), else it ends in an error."""
    victim_id, _address, engine_pid = asyncio.run(_engines(cluster))[0]
    max_tokens = 300
    stream = sync_client(url).completions.create(
        model=MODEL,
        prompt="Count forever:",
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = 0
    usage = None
    error: openai.APIError | None = None
    try:
        for chunk in stream:
            chunks += 1
            if chunks == 3:
                os.kill(engine_pid, signal.SIGKILL)
            usage = chunk.usage or usage
    except openai.APIError as exc:
        error = exc
    assert chunks >= 3
    if error is None:
        assert usage is not None and usage.completion_tokens == max_tokens, usage
    # The deployment replaces the engine (its lease expires, jobmgr starts another instance),
    # and the model is served again: the cluster is left as the other tests expect it.
    replacements = asyncio.run(_wait_engines_answer(cluster))
    assert victim_id not in replacements
    resp = sync_client(url).completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=4)
    assert resp.usage is not None and resp.usage.completion_tokens > 0
