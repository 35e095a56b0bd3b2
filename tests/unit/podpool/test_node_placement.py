"""Per-node DRAM pre-loading on Kubernetes: a node agent publishes the copies its node holds
(real etcd, real prepared-copy layout), and the pool with the Kubernetes backend (stand-in API
server, real client) claims a warm pod on a holding node, starts a cold one there, and has it
map the node's copy. Pods register in etcd as a pod does, played by the stand-in's kubelet."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from deepserve import records
from deepserve.podpool.dram_cache import DramPreloader
from deepserve.podpool.kube_pod_labels import MODEL_LABEL, ROLE_LABEL, PodModelLabeler, label_value
from deepserve.podpool.kube_settings import KubeBackendSettings
from deepserve.podpool.kubernetes_backend import KubernetesBackend
from deepserve.podpool.node_agent import NodeAgent
from deepserve.podpool.node_placement import NodePlacement
from deepserve.podpool.pod_view import PodView
from deepserve.podpool.settings import PodPoolSettings
from deepserve.podpool.warm_pool import PodRequest, WarmPodPool
from deepserve.podpool.weights_planner import WeightsPlanner
from deepserve.records import InstanceRecord, PodRecord, PodState, Role
from deepserve.scaling.timeline import WeightsSource
from deepserve.scaling.weights_cache import WeightsCacheLayout
from deepserve.store.etcd import EtcdStore, KeepAliveLease
from deepserve.store.keys import Keys
from tests.kube_apiserver import KubeApiServer, Node, kube_apiserver
from tests.tiny_model import make_tiny_llama

from .fakes import FakeAgent
from .test_dram_cache import fake_copy

pytestmark = pytest.mark.timeout(60)

NAMESPACE = "serving"


class RegisteringKubelet:
    """Plays a started engine Pod: registers it warm in etcd under its own lease."""

    def __init__(self, etcd: EtcdStore) -> None:
        self.etcd = etcd
        self.leases: dict[str, KeepAliveLease] = {}

    async def run(self, server: KubeApiServer, pod: dict[str, Any]) -> None:
        name = pod["metadata"]["name"]
        lease = await self.etcd.grant_lease(10)
        self.leases[name] = lease
        record = PodRecord(
            pod_id=name,
            state=PodState.WARM,
            address=f"{pod['status']['podIP']}:50060",
            host=name,
            pid=1,
        )
        await records.pods(self.etcd).put(name, record, lease_id=lease.id)
        server.set_phase(NAMESPACE, name, "Running")

    async def kill(self, pod: dict[str, Any], grace_s: float) -> None:
        lease = self.leases.pop(pod["metadata"]["name"], None)
        if lease is not None:
            await lease.revoke()


@pytest_asyncio.fixture
async def etcd(etcd_endpoint: str) -> AsyncIterator[EtcdStore]:
    async with EtcdStore(etcd_endpoint) as store:
        for prefix in (Keys.pods_prefix(), Keys.node_weights_prefix()):
            await store.delete_prefix(prefix)
        yield store
        for prefix in (Keys.pods_prefix(), Keys.node_weights_prefix()):
            await store.delete_prefix(prefix)


@pytest_asyncio.fixture
async def node_agent(etcd: EtcdStore, tmp_path: Path) -> AsyncIterator[NodeAgent]:
    """gpu-2's agent, holding a copy of model "m"."""
    layout = WeightsCacheLayout(tmp_path / "gpu-2-cache")
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    fake_copy(layout, "m", model_dir, nbytes=4096)
    dram = DramPreloader(layout, lambda _: model_dir, pinned=["m"], recent=0)
    agent = NodeAgent(etcd, "gpu-2", dram, lease_ttl_s=5)
    yield agent
    await agent.close()


@pytest_asyncio.fixture
async def make_pool(etcd: EtcdStore, node_agent: NodeAgent) -> AsyncIterator[Callable[..., Any]]:
    closers: list[Callable[[], Any]] = []

    async def make(warm_target: int) -> tuple[WarmPodPool, KubernetesBackend, FakeAgent]:
        kubelet = RegisteringKubelet(etcd)
        server_cm = kube_apiserver(kubelet, [Node("gpu-1"), Node("gpu-2")])
        server = await server_cm.__aenter__()
        view = PodView(etcd)
        view.start()
        await view.ready.wait()
        backend = KubernetesBackend(
            PodPoolSettings(),  # type: ignore[call-arg]
            KubeBackendSettings(api_url=server.url, namespace=NAMESPACE, pool_name="placement"),
        )
        await backend.start(lambda pod_id: view.get(pod_id) is not None)
        placement = NodePlacement(etcd, backend)
        placement.start()
        await placement.ready.wait()
        agent = FakeAgent(etcd)
        planner = WeightsPlanner(lambda: {}, fork=True, node_copy=placement.weights_plan)
        pool = WarmPodPool(
            view, backend, agent, warm_target=warm_target, planner=planner, placement=placement
        )
        pool.start()

        async def close() -> None:
            await pool.close()
            for lease in list(kubelet.leases.values()):
                await lease.revoke()
            await placement.stop()
            await view.stop()
            await server_cm.__aexit__(None, None, None)

        closers.append(close)
        return pool, backend, agent

    yield make
    for close in closers:
        await close()


async def test_the_node_agent_publishes_what_its_node_holds(
    etcd: EtcdStore, node_agent: NodeAgent
) -> None:
    assert await node_agent.publish()
    found = await records.node_weights(etcd).get("gpu-2")
    assert found is not None and found.lease_id
    assert [(c.model, c.nbytes) for c in found.record.copies] == [("m", 4096)]
    assert found.record.holds("m") and not found.record.holds("other")
    assert not await node_agent.publish()  # nothing changed: nothing written
    for entry in node_agent.dram.layout.entries():
        node_agent.dram.layout.remove(entry)
    assert await node_agent.publish()
    found = await records.node_weights(etcd).get("gpu-2")
    assert found is not None and found.record.copies == []
    await node_agent.close()  # its lease goes: the node's copies stop counting
    assert await records.node_weights(etcd).get("gpu-2") is None


async def test_a_warm_pod_on_a_holding_node_is_claimed_and_maps_the_copy(
    make_pool: Callable[..., Any], node_agent: NodeAgent
) -> None:
    await node_agent.publish()
    pool, backend, agent = await make_pool(warm_target=4)
    ok = await pool.view.wait_for(
        lambda pods: sum(p.state == PodState.WARM for p in pods.values()) == 4, 20
    )
    assert ok
    nodes = {p.pod_id: backend.node_of(p.pod_id) for p in pool.view.list()}
    assert sorted(nodes.values()) == ["gpu-1", "gpu-1", "gpu-2", "gpu-2"]
    for i in range(2):
        got = await pool.acquire(PodRequest(task_id=f"t{i}", model="m", role=Role.COLOCATED))
        assert nodes[got.pod.pod_id] == "gpu-2"
        plan = agent.plans[-1]
        assert plan is not None and plan.source is WeightsSource.DRAM
        assert plan.path.startswith(str(node_agent.dram.layout.root))
    # A model no node holds takes any pod, and loads it without a node copy.
    other = await pool.acquire(PodRequest(task_id="t9", model="other", role=Role.COLOCATED))
    assert other.pod.pod_id in nodes
    assert agent.plans[-1] is not None and agent.plans[-1].source is not WeightsSource.DRAM


async def test_a_cold_start_lands_on_a_holding_node(
    make_pool: Callable[..., Any], node_agent: NodeAgent
) -> None:
    await node_agent.publish()
    pool, backend, _ = await make_pool(warm_target=0)
    # Both nodes are empty: without a preference the scheduler would pick gpu-1 (by name).
    got = await pool.acquire(PodRequest(task_id="cold", model="m", role=Role.COLOCATED))
    assert got.cold_start
    assert backend.node_of(got.pod.pod_id) == "gpu-2"
    plain = await pool.acquire(PodRequest(task_id="cold2", model="other", role=Role.COLOCATED))
    assert backend.node_of(plain.pod.pod_id) == "gpu-1"


async def test_pod_labels_follow_what_the_pod_serves(
    make_pool: Callable[..., Any], etcd: EtcdStore
) -> None:
    pool, backend, _ = await make_pool(warm_target=1)
    labeler = PodModelLabeler(backend.started_here, backend.patch_labels)
    pool.view.add_handler(labeler.on_change)
    got = await pool.acquire(
        PodRequest(task_id="lbl", model="/models/org/Tiny-Llama", role=Role.PREFILL)
    )
    pod_id = got.pod.pod_id

    def labels(pods: dict[str, Any]) -> dict[str, str]:
        return pods[pod_id].labels if pod_id in pods else {}

    def labelled(pods: dict[str, Any]) -> bool:
        found = labels(pods)
        return (
            found.get(MODEL_LABEL) == "models-org-Tiny-Llama" and found.get(ROLE_LABEL) == "prefill"
        )

    assert await backend.watch.wait_for(labelled, 10), labels(backend.watch.pods)
    # Back to warm, where it serves nothing. The pool keeps a released pod only while it is
    # short of warm ones, and the refill may already have replaced it: ask for one more.
    pool.warm_target = 2
    assert await pool.release(pod_id) == "returned"
    assert await backend.watch.wait_for(
        lambda pods: pod_id in pods and MODEL_LABEL not in labels(pods), 10
    ), labels(backend.watch.pods)
    assert labels(backend.watch.pods)["deepserve.io/pool"] == "placement"
    await labeler.close()


def test_label_values_are_label_safe() -> None:
    assert label_value("org/Model-1B") == "org-Model-1B"
    long = label_value("/" + "x" * 100 + "/end")
    assert len(long) <= 63 and long.endswith("-end") and long[0].isalnum()


@pytest.mark.timeout(180)  # a real prepare subprocess imports torch: slow on a loaded host
async def test_the_node_agent_copies_a_model_scaled_up_anywhere(
    etcd: EtcdStore, tmp_path: Path
) -> None:
    """A new instance (anywhere) is a scale-up: the agent prepares its model's copy on its node
    (a real prepare subprocess reading a tiny Llama) and publishes it."""
    model_dir = make_tiny_llama(tmp_path / "tiny")
    dram = DramPreloader(
        WeightsCacheLayout(tmp_path / "node-cache"),
        lambda _: model_dir,
        pinned=[],
        recent=1,
        dtype="bfloat16",  # the GPU Pods' dtype, prepared on a node agent without a GPU
    )
    agent = NodeAgent(etcd, "node-x", dram, lease_ttl_s=5)
    runner = asyncio.create_task(agent.run(0.2))
    lease = await etcd.grant_lease(10)
    try:
        instance = InstanceRecord(
            instance_id="inst-x",
            model="tiny",
            role=Role.COLOCATED,
            address="10.0.0.9:1",
            pod_id="p",
        )
        await records.instances(etcd).put("inst-x", instance, lease_id=lease.id)

        async def published() -> bool:
            found = await records.node_weights(etcd).get("node-x")
            return found is not None and found.record.holds("tiny")

        deadline = asyncio.get_running_loop().time() + 150
        while not await published():
            assert asyncio.get_running_loop().time() < deadline, "no copy published"
            await asyncio.sleep(0.2)
        found = await records.node_weights(etcd).get("node-x")
        assert found is not None and found.record.copies[0].nbytes > 0
        assert found.record.copies[0].path.startswith(str(tmp_path / "node-cache"))
        assert [e.dtype for e in dram.layout.entries()] == ["bfloat16"]
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await agent.close()
        await lease.revoke()
