"""Leader election among jobmgr replicas: exactly one reconciles; another takes over when the
leader dies (its lease expires after the TTL). Real etcd, simulated pods."""

from __future__ import annotations

import asyncio
import contextlib
import time

from deepserve.jobmgr.controller import JobController
from deepserve.jobmgr.task_store import TaskStore
from deepserve.jobs.records import ServingSpec
from deepserve.jobs.store import JobStore
from deepserve.store.etcd import EtcdStore

from .fakes import FakePodProvider

TTL_S = 2


async def wait_for(condition, timeout_s: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(0.05)


def crash(controller: JobController) -> None:
    """Stops a controller without resigning, as SIGKILL would: its lease just stops refreshing."""
    assert controller._task is not None and controller.election is not None
    controller._task.cancel()
    lease = controller.election._lease
    assert lease is not None and lease._task is not None
    lease._task.cancel()


async def test_one_leader_reconciles_and_another_takes_over(etcd: EtcdStore) -> None:
    pods = FakePodProvider(etcd)
    controllers = [
        JobController(etcd, pods, candidate_id=name, election_ttl_s=TTL_S, resync_interval_s=1)
        for name in ("jm-a", "jm-b")
    ]
    jobs, tasks = JobStore(etcd), TaskStore(etcd)
    try:
        controllers[0].start()
        await wait_for(lambda: _true(controllers[0].is_leader))
        controllers[1].start()
        job = await jobs.create_serving(ServingSpec(model="m", replicas=2, max_replicas=3))
        job_id = job.record.job_id

        async def running(n: int) -> bool:
            found = await tasks.list(job_id)
            return sum(t.record.state.value == "running" for t in found) == n

        await wait_for(lambda: running(2))
        assert {t.record.created_by for t in await tasks.list(job_id)} == {"jm-a"}
        assert not controllers[1].is_leader
        assert controllers[1].reconciler.passes == 0

        crash(controllers[0])
        await wait_for(lambda: _true(controllers[1].is_leader), timeout_s=TTL_S + 5)
        await jobs.scale(job_id, 3)
        await wait_for(lambda: running(3))
        creators = [t.record.created_by for t in await tasks.list(job_id)]
        assert sorted(creators) == ["jm-a", "jm-a", "jm-b"]
    finally:
        for controller in controllers:
            with contextlib.suppress(Exception):
                await controller.stop()
        await pods.close()


async def _true(value: bool) -> bool:
    return value
