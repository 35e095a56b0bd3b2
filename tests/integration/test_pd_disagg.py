"""PD disaggregation across processes. Starts real processes: etcd, valkey-server (session
fixtures) and two `python -m deepserve.flowserve` pods on 127.0.0.1 (one prefill, one decode)
with a tiny random Llama; KV crosses between them as gRPC bytes, never shared memory. The tests
share the pair; a test that kills a pod leaves it dead and the `pods` fixture starts a new one
for the next test, so each passes alone and in any order."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from deepserve.processes import ManagedProcess, free_port, wait_for_port
from deepserve.v1 import common_pb2, flowserve_pb2, flowserve_pb2_grpc
from tests.tiny_model import make_tiny_llama
from tests.unit.flowserve.runner.tiny_models import save_tiny_model

pytestmark = pytest.mark.integration

MAX_NEW = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Wide random weights (outputs depend on every KV block) plus a tokenizer for the shell.
    path = save_tiny_model(tmp_path_factory.mktemp("pd-model"))
    tokenizer_source = make_tiny_llama(tmp_path_factory.mktemp("tok") / "tiny")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_source / name, path / name)
    return path


def start_pod(
    role: str, model_dir: Path, run_dir: Path, etcd_endpoint: str, redis_url: str
) -> tuple[ManagedProcess, str]:
    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "DEEPSERVE_ETCD_ENDPOINT": etcd_endpoint,
            "DEEPSERVE_REDIS_URL": redis_url,
            "DEEPSERVE_LEASE_TTL_S": "2",
            "DEEPSERVE_FLOWSERVE_GRPC_PORT": str(port),
            "DEEPSERVE_FLOWSERVE_POD_ID": f"pd-{role}-{port}",
            "DEEPSERVE_FLOWSERVE_MODEL": str(model_dir),
            "DEEPSERVE_FLOWSERVE_ROLE": role,
            "DEEPSERVE_FLOWSERVE_DEVICE": "cpu",
            "DEEPSERVE_FLOWSERVE_KV_CACHE_BLOCKS": "128",
            "DEEPSERVE_FLOWSERVE_BLOCK_SIZE": "4",
            "DEEPSERVE_FLOWSERVE_STEP_TOKEN_BUDGET": "32",
            # The cross-host path: KV inside gRPC messages, in small chunks.
            "DEEPSERVE_FLOWSERVE_KV_ALLOW_SHARED_MEMORY": "false",
            "DEEPSERVE_FLOWSERVE_KV_MAX_CHUNK_BYTES": "4096",
            "DEEPSERVE_FLOWSERVE_KV_IDLE_TIMEOUT_S": "2",
            "OMP_NUM_THREADS": "1",
        }
    )
    proc = ManagedProcess(
        f"flowserve-{role}",
        [sys.executable, "-m", "deepserve.flowserve"],
        run_dir / f"{role}.log",
        env=env,
    ).start()
    return proc, f"127.0.0.1:{port}"


class PdPods:
    """The prefill and decode pods, each started again when a test left it dead."""

    def __init__(self, model_dir: Path, run_dir: Path, etcd_endpoint: str, redis_url: str) -> None:
        self._args = (model_dir, run_dir, etcd_endpoint, redis_url)
        self.started: dict[str, tuple[ManagedProcess, str]] = {}

    def ready(self) -> dict[str, tuple[ManagedProcess, str]]:
        """Both pods, serving: a dead one is replaced by a new process (on a new port)."""
        for role in ("prefill", "decode"):
            if role not in self.started or not self.started[role][0].alive():
                if role in self.started:
                    self.started[role][0].stop()
                self.started[role] = start_pod(role, *self._args)
        for proc, address in self.started.values():
            host, port = address.rsplit(":", 1)
            if not wait_for_port(host, int(port), 60):
                pytest.fail(f"{proc.name} did not start:\n{proc.tail()}")
        asyncio.run(_wait_ready([address for _, address in self.started.values()]))
        return dict(self.started)

    def stop(self) -> None:
        for proc, _ in self.started.values():
            proc.stop()


@pytest.fixture(scope="module")
def pd_pods(
    model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    etcd_endpoint: str,
    redis_url: str,
) -> Iterator[PdPods]:
    started = PdPods(model_dir, tmp_path_factory.mktemp("pd-run"), etcd_endpoint, redis_url)
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def pods(pd_pods: PdPods) -> dict[str, tuple[ManagedProcess, str]]:
    return pd_pods.ready()


async def _wait_ready(addresses: list[str], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    for address in addresses:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = flowserve_pb2_grpc.FlowServeServiceStub(channel)
            while not (await stub.GetStats(flowserve_pb2.GetStatsRequest(), timeout=5)).ready:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{address} never became ready")
                await asyncio.sleep(0.2)


def request(
    request_id: str, prompt: list[int], prefill_address: str = "", mode: int = 0
) -> flowserve_pb2.GenerateRequest:
    return flowserve_pb2.GenerateRequest(
        request_id=request_id,
        prompt_token_ids=prompt,
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True),
        prefill_address=prefill_address,
        kv_transfer_mode=mode,  # type: ignore[arg-type]
    )


async def tokens_of(address: str, req: flowserve_pb2.GenerateRequest) -> list[int]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = flowserve_pb2_grpc.FlowServeServiceStub(channel)
        return [t async for reply in stub.Generate(req, timeout=60) for t in reply.token_ids]


async def blocks_used(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = flowserve_pb2_grpc.FlowServeServiceStub(channel)
        stats = await stub.GetStats(flowserve_pb2.GetStatsRequest(), timeout=5)
    return stats.kv_blocks_used + stats.running_requests + stats.waiting_requests


async def settle(address: str, timeout_s: float = 10.0) -> int:
    """Blocks and requests still held once the instance had time to clean up."""
    deadline = time.monotonic() + timeout_s
    while True:
        used = await blocks_used(address)
        if not used or time.monotonic() > deadline:
            return used
        await asyncio.sleep(0.1)


PROMPTS = [[(i * 37 + 11) % 250 + 3 for i in range(n)] for n in (1, 5, 16, 57)] + [
    [(i * 37 + 11) % 250 + 3 for i in range(16)] + [7, 8, 9]
]


async def kv_received(address: str) -> flowserve_pb2.KVTransferStats:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = flowserve_pb2_grpc.FlowServeServiceStub(channel)
        return (await stub.GetStats(flowserve_pb2.GetStatsRequest(), timeout=5)).kv_received


def test_pd_pair_matches_colocated_over_grpc(pods: dict[str, tuple[ManagedProcess, str]]) -> None:
    prefill, decode = pods["prefill"][1], pods["decode"][1]

    async def run() -> None:
        # The decode pod's counters are cumulative (another test may have run on it first).
        before = await kv_received(decode)
        modes = (
            flowserve_pb2.KV_TRANSFER_MODE_WHOLE_REQUEST,
            flowserve_pb2.KV_TRANSFER_MODE_LAYERWISE,
        )
        for i, base in enumerate(PROMPTS):
            for mode in modes:
                # A prompt neither instance has seen: every block crosses.
                prompt = [mode, *base]
                pd = await tokens_of(decode, request(f"d{i}-{mode}", prompt, prefill, mode))
                colocated = await tokens_of(decode, request(f"c{i}-{mode}", prompt))
                assert pd == colocated, (i, mode)
                assert pd == await tokens_of(prefill, request(f"p{i}-{mode}", prompt))
        assert await settle(decode) == 0
        assert await settle(prefill) == 0
        after = await kv_received(decode)
        assert after.transfers - before.transfers == 2 * len(PROMPTS)
        assert after.failures == before.failures
        # The real runner streams layer by layer.
        assert after.layerwise - before.layerwise == len(PROMPTS)
        # gRPC bytes crossed, never shared memory.
        assert after.shared_memory == before.shared_memory and after.bytes > before.bytes

    asyncio.run(run())


def test_hung_then_dead_prefill_ends_requests_unavailable(
    pods: dict[str, tuple[ManagedProcess, str]],
) -> None:
    proc, prefill = pods["prefill"]
    decode = pods["decode"][1]
    prompt = [(i * 13 + 5) % 250 + 3 for i in range(40)]

    async def expect_unavailable(request_id: str) -> float:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await tokens_of(decode, request(request_id, prompt, prefill))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert prefill in (info.value.details() or "")
        return time.monotonic() - started

    async def run() -> None:
        os.kill(proc.pid, signal.SIGSTOP)  # hung: the decode side's idle timeout (2 s) fires
        try:
            assert await expect_unavailable("hung") < 30
            assert await settle(decode) == 0
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert await settle(prefill) == 0  # it saw the cancelled stream and freed its blocks
        os.kill(proc.pid, signal.SIGKILL)  # dead: the connection is refused
        assert proc.popen is not None
        proc.popen.wait(10)
        assert await expect_unavailable("dead") < 30
        assert await settle(decode) == 0
        # The decode instance still serves on its own.
        assert len(await tokens_of(decode, request("alone", prompt))) == MAX_NEW

    asyncio.run(run())
