"""DRAM pre-loading and the weights planner: real prepared copies (a real subprocess reads a
tiny Llama from disk), real etcd for the pool; the pods are simulated (tests/unit/podpool/fakes)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from deepserve.podpool.dram_cache import DramPreloader
from deepserve.podpool.pod_view import PodView
from deepserve.podpool.warm_pool import PodRequest, WarmPodPool
from deepserve.podpool.weights_planner import WeightsPlanner
from deepserve.records import InstanceRecord, PodRecord, PodState, Role
from deepserve.scaling.timeline import ScaleStep, WeightsSource
from deepserve.scaling.weights_cache import WeightsCacheLayout
from deepserve.store.etcd import EtcdStore
from deepserve.store.keys import Keys
from tests.tiny_model import make_tiny_llama

from .fakes import FakeAgent, FakeBackend

HOST = socket.gethostname()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dram-models")
    return {name: make_tiny_llama(root / name, seed=i) for i, name in enumerate(("a", "b", "c"))}


def resolver(models: dict[str, Path]):  # type: ignore[no-untyped-def]
    def resolve(model: str) -> Path:
        from deepserve.errors import NotFound

        if model not in models:
            raise NotFound(f"no model {model}")
        return models[model]

    return resolve


def fake_copy(
    layout: WeightsCacheLayout,
    model: str,
    model_dir: Path,
    nbytes: int = 100,
    origin: str = "preload",
) -> None:
    """A published copy without torch (the planner and the eviction only read manifests)."""
    staging = layout.new_staging_dir()
    (staging / "rank0-of-1.weights").write_bytes(b"\0" * nbytes)
    layout.publish(
        staging, model=model, model_dir=model_dir, dtype="float32", tp_size=1, nbytes=nbytes,
        origin=origin,
    )  # fmt: skip


def mapped_range(path: Path) -> tuple[int, int]:
    """Address range of this process's mappings of `path` (from /proc/self/maps)."""
    starts, ends = [], []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path.resolve())):
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            starts.append(start)
            ends.append(end)
    assert starts, f"{path} is not mapped"
    return min(starts), max(ends)


def pod(pod_id: str, host: str = HOST) -> PodRecord:
    return PodRecord(
        pod_id=pod_id, state=PodState.ASSIGNED, address=f"{pod_id}:1", host=host, pid=1
    )


def instance(instance_id: str, model: str, at: float) -> InstanceRecord:
    return InstanceRecord(
        instance_id=instance_id, model=model, role=Role.COLOCATED, address=f"{instance_id}:9",
        pod_id=f"pod-{instance_id}", registered_at=at,
    )  # fmt: skip


async def test_preloader_prepares_a_mappable_copy_in_a_subprocess(
    models: dict[str, Path], tmp_path: Path
) -> None:
    layout = WeightsCacheLayout(tmp_path / "cache")
    dram = DramPreloader(layout, resolver(models), pinned=["a"], recent=0, device="cpu")
    await dram.reconcile()  # starts the pinned copy
    task = dram.preparing("a")
    assert task is not None
    assert [(c.model, c.ready) for c in dram.copies()] == [("a", False)]
    entry = await asyncio.wait_for(task, 120)
    assert entry is not None and entry.origin == "preload" and entry.nbytes > 0
    assert dram.find("a") == entry and dram.find("b") is None
    assert [(c.model, c.ready, c.pinned) for c in dram.copies()] == [("a", True, True)]

    # The copy is a model directory whose weights equal the disk's, mapped without a copy.
    import torch

    from deepserve.flowserve.model.config import ModelConfig
    from deepserve.flowserve.model.weights import load_llama_weights

    config = ModelConfig.from_model_dir(models["a"])
    disk = load_llama_weights(models["a"], config)
    mapped = load_llama_weights(entry.path, config)
    assert torch.equal(disk.layers[1].qkv, mapped.layers[1].qkv)
    assert torch.equal(disk.embed, mapped.embed) and mapped.lm_head is mapped.embed
    # The tensors are views of the mapped file, not copies of it.
    span = mapped_range(entry.rank_path(0))
    for tensor in (mapped.embed, mapped.layers[0].qkv, mapped.final_norm):
        assert span[0] <= tensor.data_ptr() < span[1]
    assert (entry.path / "config.json").is_file() and (entry.path / "tokenizer.json").is_file()


async def test_eviction_keeps_pinned_and_recent_copies_within_the_budget(
    models: dict[str, Path], tmp_path: Path
) -> None:
    layout = WeightsCacheLayout(tmp_path / "cache")
    for name in ("a", "b", "c"):
        fake_copy(layout, name, models[name], nbytes=1000)
    dram = DramPreloader(layout, resolver(models), pinned=["a"], recent=1, budget_bytes=0)
    dram.note_demand("b")  # an existing copy: nothing to prepare
    assert dram.preparing("b") is None
    await dram.reconcile()
    assert sorted(e.model for e in layout.entries()) == ["a", "b"]  # c: neither pinned nor recent
    dram.note_demand("c")  # c is now the most recent; b drops out of the recent window
    await asyncio.sleep(0)
    if (task := dram.preparing("c")) is not None:
        task.cancel()
    fake_copy(layout, "c", models["c"], nbytes=1000)
    await dram.reconcile()
    assert sorted(e.model for e in layout.entries()) == ["a", "c"]
    tight = DramPreloader(layout, resolver(models), pinned=["a"], recent=5, budget_bytes=1500)
    tight.note_demand("c")
    await tight.reconcile()
    assert [e.model for e in layout.entries()] == ["a"]  # over budget: the unpinned one goes


async def test_a_copy_a_fork_left_is_kept_for_the_next_instance(
    models: dict[str, Path], tmp_path: Path
) -> None:
    # No recent models are kept (dram_recent_models 0): a copy a fork just left is still the
    # next instance's DRAM copy, until it is fork_copy_keep_s old.
    layout = WeightsCacheLayout(tmp_path / "cache")
    fake_copy(layout, "a", models["a"], origin="fork")
    fake_copy(layout, "b", models["b"], origin="preload")
    dram = DramPreloader(layout, resolver(models), pinned=[], recent=0)
    await dram.reconcile()
    assert [e.model for e in layout.entries()] == ["a"]
    dram.fork_copy_keep_s = 0.0
    await dram.reconcile()
    assert layout.entries() == []


async def test_planner_prefers_dram_then_forks_from_the_least_busy_source(
    models: dict[str, Path], tmp_path: Path
) -> None:
    layout = WeightsCacheLayout(tmp_path / "cache")
    dram = DramPreloader(layout, resolver(models), pinned=[], recent=0)
    live = {"i1": instance("i1", "a", 1.0), "i2": instance("i2", "a", 2.0)}
    planner = WeightsPlanner(lambda: live, dram=dram, host=HOST)
    # Nothing runs "b": the pod reads the disk (or a copy it finds).
    async with planner.plan(pod("p0"), "b") as plan:
        assert plan.source == WeightsSource.UNSPECIFIED
    # Two loads on other hosts at once: each fork source feeds one.
    async with planner.plan(pod("p1", host="h1"), "a") as one:
        async with planner.plan(pod("p2", host="h2"), "a") as two:
            assert {one.fork_from, two.fork_from} == {"i1:9", "i2:9"}
            assert planner.stats()["forks_in_flight"] == 2
    assert planner.stats()["forks_in_flight"] == 0
    # tp > 1 never forks.
    async with planner.plan(pod("p3"), "a", tp_size=2) as plan:
        assert plan.source == WeightsSource.UNSPECIFIED
    # A copy on this host wins over a fork.
    fake_copy(layout, "a", models["a"])
    async with planner.plan(pod("p4"), "a") as plan:
        assert plan.source == WeightsSource.DRAM
        assert plan.path == str(layout.entries()[0].path)


async def test_second_load_on_a_host_waits_for_the_fork_in_flight_and_maps_its_copy(
    models: dict[str, Path], tmp_path: Path
) -> None:
    layout = WeightsCacheLayout(tmp_path / "cache")
    dram = DramPreloader(layout, resolver(models), pinned=[], recent=0)
    planner = WeightsPlanner(lambda: {"i1": instance("i1", "a", 1.0)}, dram=dram, host=HOST)
    second_plan: list[WeightsSource] = []

    async def second() -> None:
        async with planner.plan(pod("p2"), "a") as plan:
            second_plan.append(plan.source)

    async with planner.plan(pod("p1"), "a") as first:
        assert first.source == WeightsSource.FORK
        waiter = asyncio.create_task(second())
        await asyncio.sleep(0.1)
        assert not second_plan  # held while the first fork runs
        fake_copy(layout, "a", models["a"])  # what the fork target publishes
    await asyncio.wait_for(waiter, 5)
    assert second_plan == [WeightsSource.DRAM]


@pytest.fixture
async def etcd(etcd_endpoint: str) -> AsyncIterator[EtcdStore]:
    async with EtcdStore(etcd_endpoint) as store:
        await store.delete_prefix(Keys.pods_prefix())
        yield store
        await store.delete_prefix(Keys.pods_prefix())


async def test_acquire_passes_the_plan_and_returns_the_five_step_timeline(
    etcd: EtcdStore, models: dict[str, Path], tmp_path: Path
) -> None:
    layout = WeightsCacheLayout(tmp_path / "cache")
    fake_copy(layout, "a", models["a"])
    dram = DramPreloader(layout, resolver(models), pinned=[], recent=0)
    view = PodView(etcd)
    view.start()
    await view.ready.wait()
    agent = FakeAgent(etcd)
    pool = WarmPodPool(
        view, FakeBackend(etcd), agent, warm_target=1,
        planner=WeightsPlanner(lambda: {}, dram=dram, host=HOST),
    )  # fmt: skip
    pool.start()
    try:
        assert await view.wait_for(
            lambda pods: any(p.state == PodState.WARM for p in pods.values()), 10
        )
        acquired = await pool.acquire(PodRequest(task_id="t1", model="a", job_id="j"))
        assert agent.plans[0] is not None and agent.plans[0].source == WeightsSource.DRAM
        steps = acquired.timeline.steps
        assert [s.step for s in steps[:2]] == [ScaleStep.POD_ACQUIRED, ScaleStep.ENGINE_STARTED]
        assert steps[0].detail.startswith("warm pod")
        assert steps[1].seconds == 0.0 and "pre-warmed" in steps[1].detail
    finally:
        await pool.close()
        await view.stop()
