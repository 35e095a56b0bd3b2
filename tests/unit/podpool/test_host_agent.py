"""A real host agent process (`python -m deepserve.podpool.host_agent`) on real etcd and
Redis, driven over gRPC by podpool's client: it registers as `podhost`, starts a real pod that
registers under its host's name, lists it, ends it; bad input gets INVALID_ARGUMENT."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from deepserve import records
from deepserve.podpool.host_client import GrpcHostClient
from deepserve.processes import ManagedProcess, free_port, with_owner
from deepserve.rpc.client import insecure_channel
from deepserve.store.etcd import EtcdStore
from deepserve.v1 import podhost_pb2, podhost_pb2_grpc
from tests.polling import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture
async def agent(
    etcd_endpoint: str, redis_url: str, tmp_path: Path
) -> AsyncIterator[tuple[str, str]]:
    host_name, port = f"unit-host-{uuid.uuid4().hex[:6]}", free_port()
    env = with_owner(
        {
            **os.environ,
            "DEEPSERVE_ETCD_ENDPOINT": etcd_endpoint,
            "DEEPSERVE_REDIS_URL": redis_url,
            "DEEPSERVE_HOST_NAME": host_name,
            "DEEPSERVE_LEASE_TTL_S": "3",
            "DEEPSERVE_PODHOST_GRPC_PORT": str(port),
            "DEEPSERVE_PODPOOL_POD_LOG_DIR": str(tmp_path / "pods"),
            "DEEPSERVE_PODPOOL_POD_THREADS": "1",
            "DEEPSERVE_PODPOOL_WEIGHTS_CACHE_DIR": "",
        }
    )
    proc = ManagedProcess(
        "podhost", [sys.executable, "-m", "deepserve.podpool.host_agent"],
        tmp_path / "agent.log", env=env,
    ).start()  # fmt: skip
    try:
        yield f"127.0.0.1:{port}", host_name
    finally:
        proc.stop(30)


async def test_the_agent_registers_starts_lists_and_ends_a_pod(
    agent: tuple[str, str], etcd_endpoint: str
) -> None:
    address, host_name = agent
    client = GrpcHostClient(timeout_s=60)
    async with EtcdStore(etcd_endpoint) as etcd:

        async def registered() -> bool:
            found, _ = await records.services(etcd, "podhost").list()
            return any(v.record.address == address for v in found)

        await eventually(registered, 60)
        pod_id = f"pod-{uuid.uuid4().hex[:8]}"
        assert await client.create_pod(address, pod_id) == host_name
        await client.create_pod(address, pod_id)  # a retried call starts nothing more
        assert (await client.list_pods(address)) == (host_name, [pod_id])

        async def warm() -> bool:
            found = await records.pods(etcd).get(pod_id)
            return found is not None and found.record.state.value == "warm"

        await eventually(warm, 180)
        found = await records.pods(etcd).get(pod_id)
        assert found is not None and found.record.host == host_name

        await client.delete_pod(address, pod_id, found.record.pid)

        async def ended() -> bool:
            return await records.pods(etcd).get(pod_id) is None

        await eventually(ended, 60)
        assert (await client.list_pods(address)) == (host_name, [])
    await client.close()


async def test_bad_input_is_invalid_argument_naming_the_field(agent: tuple[str, str]) -> None:
    address, _ = agent
    async with insecure_channel(address, traced=False) as channel:
        stub = podhost_pb2_grpc.PodHostServiceStub(channel)
        await channel.channel_ready()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreatePod(podhost_pb2.CreatePodRequest(pod_id=""), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "pod id" in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.DeletePod(podhost_pb2.DeletePodRequest(pod_id="p", pid=-1), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(err.value.trailing_metadata() or ()).get("field") in ("pid", None)
