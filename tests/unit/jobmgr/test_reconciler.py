"""The reconcile loop over a real etcd with simulated pods (records under real leases)."""

from __future__ import annotations

from deepserve.jobmgr.task_records import TaskState
from deepserve.jobs.records import JobPhase, ServingMode, ServingSpec
from deepserve.records import Role

from .conftest import Harness


def reasons(job) -> list[str]:  # type: ignore[no-untyped-def]
    return [e.reason for e in job.record.events]


async def deploy(h: Harness, **spec: object) -> str:
    job = await h.jobs.create_serving(ServingSpec(model="m", **spec))  # type: ignore[arg-type]
    return job.record.job_id


async def test_two_replicas_become_two_running_tasks(harness: Harness) -> None:
    h = harness
    job_id = await deploy(h, replicas=2)

    async def ready() -> bool:
        job = await h.jobs.get(job_id)
        return job.record.status.ready_replicas == 2

    await h.settle(ready)
    running = await h.running(job_id)
    assert sorted(t.slot for t in running) == ["r0-colocated0", "r1-colocated0"]
    assert all(t.instance_id and t.pod_id and t.created_by == "test-leader" for t in running)
    job = await h.jobs.get(job_id)
    assert job.record.status.phase == JobPhase.RUNNING
    assert reasons(job).count("TaskCreated") == 2
    assert "TaskRunning" in reasons(job)
    # Nothing left to do: further passes change nothing.
    revision = job.mod_revision
    for _ in range(3):
        await h.reconciler.reconcile_all()
    assert (await h.jobs.get(job_id)).mod_revision == revision
    assert len(h.pods.acquired) == 2


async def test_a_dead_pod_is_noticed_and_its_task_replaced(harness: Harness) -> None:
    h = harness
    job_id = await deploy(h, replicas=2)

    async def two_running() -> bool:
        return len(await h.running(job_id)) == 2

    await h.settle(two_running)
    victim = (await h.running(job_id))[0]
    await h.pods.kill(victim.pod_id)  # SIGKILL: the lease (and the instance) vanish

    async def replaced() -> bool:
        tasks = await h.running(job_id)
        return len(tasks) == 2 and victim.task_id not in {t.task_id for t in tasks}

    await h.settle(replaced)
    replacement = next(t for t in await h.running(job_id) if t.slot == victim.slot)
    assert replacement.pod_id != victim.pod_id
    job = await h.jobs.get(job_id)
    assert "TaskFailed" in reasons(job)
    assert "TaskReplaced" in reasons(job)
    failed = next(e for e in job.record.events if e.reason == "TaskFailed")
    assert victim.pod_id in failed.message and "vanished" in failed.message


async def test_scale_down_removes_tasks_and_releases_their_pods(harness: Harness) -> None:
    h = harness
    job_id = await deploy(h, replicas=3, max_replicas=3)

    async def three() -> bool:
        return len(await h.running(job_id)) == 3

    await h.settle(three)
    await h.jobs.scale(job_id, 1)

    async def one_left() -> bool:
        return len(await h.tasks.list(job_id)) == 1

    await h.settle(one_left)
    (left,) = await h.running(job_id)
    assert left.slot == "r0-colocated0"
    assert len(h.pods.released) == 2
    job = await h.jobs.get(job_id)
    assert job.record.status.ready_replicas == 1
    assert reasons(job).count("TaskRemoved") == 2


async def test_disaggregated_replica_is_a_prefill_and_decode_tasks(harness: Harness) -> None:
    h = harness
    job_id = await deploy(
        h, replicas=1, mode=ServingMode.DISAGGREGATED, prefill_instances=1, decode_instances=2
    )

    async def ready() -> bool:
        return (await h.jobs.get(job_id)).record.status.ready_replicas == 1

    await h.settle(ready)
    roles = sorted(t.role.value for t in await h.running(job_id))
    assert roles == [Role.DECODE.value, Role.DECODE.value, Role.PREFILL.value]


async def test_delete_stops_everything_then_removes_the_job(harness: Harness) -> None:
    h = harness
    job_id = await deploy(h, replicas=2)

    async def ready() -> bool:
        return len(await h.running(job_id)) == 2

    await h.settle(ready)
    await h.jobs.delete(job_id)

    async def gone() -> bool:
        return not await h.jobs.list() and not await h.tasks.list(job_id)

    await h.settle(gone)
    assert len(h.pods.released) == 2


async def test_failed_start_is_retried_with_backoff(harness: Harness) -> None:
    h = harness
    h.pods.fail_models.add("m")
    job_id = await deploy(h, replicas=1)

    async def failed_once() -> bool:
        job = await h.jobs.get(job_id)
        return "TaskStartFailed" in reasons(job)

    await h.settle(failed_once)
    assert (await h.jobs.get(job_id)).record.status.phase == JobPhase.PENDING
    h.pods.fail_models.clear()

    async def ready() -> bool:
        return len(await h.running(job_id)) == 1

    await h.settle(ready)
    assert len(h.pods.acquired) >= 2
    job = await h.jobs.get(job_id)
    assert "TaskReplaced" in reasons(job)  # the failed task made way for a new one


async def test_cold_start_is_recorded_in_the_task_and_job_events(harness: Harness) -> None:
    h = harness
    h.pods.warm = 0
    job_id = await deploy(h, replicas=1)

    async def ready() -> bool:
        return len(await h.running(job_id)) == 1

    await h.settle(ready)
    (task,) = await h.running(job_id)
    assert task.cold_start
    cold = [e for e in task.events if e.reason == "ColdStart"]
    assert cold and "no warm pod was free" in cold[0].message
    assert "ColdStart" in reasons(await h.jobs.get(job_id))


async def test_tasks_of_a_cancelled_job_are_stopped(harness: Harness) -> None:
    h = harness
    job_id = await deploy(h, replicas=1)

    async def ready() -> bool:
        return len(await h.running(job_id)) == 1

    await h.settle(ready)
    await h.jobs.cancel(job_id)

    async def stopped() -> bool:
        return not await h.tasks.list(job_id)

    await h.settle(stopped)
    job = await h.jobs.get(job_id)
    assert job.record.status.phase == JobPhase.CANCELLED


async def test_a_task_placed_by_a_previous_leader_is_adopted(harness: Harness) -> None:
    """A task still STARTING with nothing in flight is placed again; placing is idempotent."""
    h = harness
    job_id = await deploy(h, replicas=1)
    h.pods.delay_s = 30  # the 'old leader' hangs in AcquirePod ...
    await h.reconciler.reconcile_all()
    (task,) = await h.tasks.list(job_id)
    await h.reconciler.stop()  # ... and dies
    assert task.record.state in (TaskState.PENDING, TaskState.STARTING)
    h.pods.delay_s = 0

    async def ready() -> bool:
        return len(await h.running(job_id)) == 1

    await h.settle(ready)
    (running,) = await h.running(job_id)
    assert running.task_id == task.record.task_id  # the same task, not a duplicate


async def test_a_burst_records_every_event_in_fewer_job_writes(harness: Harness) -> None:
    h = harness
    job_id = await deploy(h, replicas=12, max_replicas=12)

    async def ready() -> bool:
        job = await h.jobs.get(job_id)
        return job.record.status.ready_replicas == 12 and reasons(job).count("TaskRunning") == 12

    await h.settle(ready)
    job = await h.jobs.get(job_id)
    # Twelve operations finished together: none of their events lost to the contended record,
    # and they shared job-record writes instead of racing twelve read-modify-writes.
    assert reasons(job).count("TaskRunning") == 12
    assert h.reconciler.event_writes < 12
