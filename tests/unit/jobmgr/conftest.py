"""A clean etcd key space and a reconciler over simulated pods, per test."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from deepserve import records
from deepserve.jobmgr.reconciler import Reconciler
from deepserve.jobmgr.task_records import TaskRecord
from deepserve.jobmgr.task_store import TaskStore
from deepserve.jobs.store import JobStore
from deepserve.store.etcd import EtcdStore
from deepserve.store.informer import Informer
from deepserve.store.keys import Keys

from .fakes import FakePodProvider

PREFIXES = (
    Keys.jobs_prefix(),
    Keys.tasks_prefix(),
    Keys.pods_prefix(),
    Keys.instances_prefix(),
    Keys.election_prefix("jobmgr"),
)


@pytest.fixture
async def etcd(etcd_endpoint: str) -> AsyncIterator[EtcdStore]:
    async with EtcdStore(etcd_endpoint) as store:
        for prefix in PREFIXES:
            await store.delete_prefix(prefix)
        yield store
        for prefix in PREFIXES:
            await store.delete_prefix(prefix)


@dataclass
class Harness:
    """A reconciler, its stores and mirrors, and a way to run passes until a condition holds."""

    jobs: JobStore
    tasks: TaskStore
    pods: FakePodProvider
    reconciler: Reconciler
    mirrors: list[Informer]  # type: ignore[type-arg]

    async def settle(
        self, condition: Callable[[], Awaitable[bool]], timeout_s: float = 10.0
    ) -> None:
        """Runs reconcile passes (as the controller would on wake-ups) until `condition`."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.reconciler.wake.clear()
            await self.reconciler.reconcile_all()
            if await condition():
                return
            if time.monotonic() > deadline:
                tasks = [(t.record.slot, t.record.state) for t in await self.tasks.list()]
                raise AssertionError(f"did not settle; tasks {tasks}")
            await asyncio.sleep(0.05)

    async def running(self, job_id: str) -> list[TaskRecord]:
        return [
            t.record for t in await self.tasks.list(job_id) if t.record.state.value == "running"
        ]


@pytest.fixture
async def harness(etcd: EtcdStore) -> AsyncIterator[Harness]:
    pods = FakePodProvider(etcd)
    pod_mirror = Informer(records.pods(etcd))
    instance_mirror = Informer(records.instances(etcd))
    for mirror in (pod_mirror, instance_mirror):
        mirror.start()
        await mirror.ready.wait()
    reconciler = Reconciler(
        JobStore(etcd),
        TaskStore(etcd),
        pods,
        pod_mirror,
        instance_mirror,
        actor="test-leader",
        backoff_s=0.2,
        backoff_max_s=0.5,
    )
    h = Harness(JobStore(etcd), TaskStore(etcd), pods, reconciler, [pod_mirror, instance_mirror])
    yield h
    await reconciler.stop()
    await pods.close()
    for mirror in h.mirrors:
        await mirror.stop()
