"""Drives every serving job's actual tasks toward its desired shape (level-triggered).

One pass reads desired state (jobs) and actual state (tasks, pods, instances) and acts on the
difference: creates tasks for empty slots and asks the pod pool to place them, marks a task
failed when its instance vanished (its pod died or lost its lease), replaces failed tasks,
removes tasks beyond the desired shape, writes each job's status. A pass is safe to run at any
moment and any number of times: watches only wake it, and every write is a compare-and-swap.
Slow work (placing a task, releasing a pod) runs as one background operation per task, so a
pass never waits on a model load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Coroutine, Mapping
from functools import partial
from typing import Any, Protocol

from opentelemetry import trace

from deepserve.errors import Conflict, DeepServeError
from deepserve.jobmgr.pod_provider import PodAsk, PodProvider
from deepserve.jobmgr.scaling_metrics import observe_scale_up
from deepserve.jobmgr.task_records import TaskRecord, TaskSlot, TaskState, desired_slots
from deepserve.jobmgr.task_store import TaskStore
from deepserve.jobs.records import JobKind, JobPhase, JobRecord
from deepserve.jobs.store import JobStore
from deepserve.records import InstanceRecord, PodRecord, PodState
from deepserve.store.coalescer import Coalescer
from deepserve.store.etcd import EtcdStore, Versioned
from deepserve.store.keys import Keys

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)


class Mirror(Protocol):
    """A watched, in-memory copy of one etcd prefix (an Informer)."""

    @property
    def items(self) -> Mapping[str, Any]: ...

    @property
    def store(self) -> EtcdStore: ...


def new_task_id(job_id: str, slot: TaskSlot) -> str:
    return f"{job_id}-{slot.name}-{uuid.uuid4().hex[:4]}"


class Reconciler:
    """One jobmgr leader's reconcile passes and the background operations they start."""

    def __init__(
        self,
        jobs: JobStore,
        tasks: TaskStore,
        pods: PodProvider,
        pod_mirror: Mirror,
        instance_mirror: Mirror,
        *,
        actor: str,
        acquire_timeout_s: float = 300.0,
        backoff_s: float = 1.0,
        backoff_max_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._jobs = jobs
        self._tasks = tasks
        self._pods = pods
        self._pod_mirror = pod_mirror
        self._instance_mirror = instance_mirror
        self.actor = actor
        self._acquire_timeout_s = acquire_timeout_s
        self._backoff_s = backoff_s
        self._backoff_max_s = backoff_max_s
        self._clock = clock
        self._ops: dict[str, asyncio.Task[None]] = {}
        # Keys of the operations in `_ops` that remove a task (the others place one).
        self._removing: set[str] = set()
        # (job id, slot) -> (consecutive failures, earliest next attempt)
        self._failures: dict[tuple[str, str], tuple[int, float]] = {}
        # Set when a background operation ends, so the loop runs another pass at once.
        self.wake = asyncio.Event()
        self.passes = 0
        # Per job: events of concurrent operations written together (a burst of 64 tasks
        # would otherwise race 64 read-modify-writes on one job record).
        self._event_writers: dict[str, Coalescer[tuple[str, str], None]] = {}

    # --- passes ----------------------------------------------------------------------------

    async def reconcile_all(self) -> None:
        # Pods before tasks: a pod claimed for a task was claimed after the task was written,
        # so a pod whose task is missing from the (later) task list really is an orphan.
        pods: dict[str, PodRecord] = dict(self._pod_mirror.items)
        instances: dict[str, InstanceRecord] = dict(self._instance_mirror.items)
        every_job = await self._jobs.list()
        jobs = [j for j in every_job if j.record.kind == JobKind.SERVING]
        # Fine-tuning and batch jobs' tasks belong to their own controllers.
        other_jobs = {j.record.job_id for j in every_job if j.record.kind != JobKind.SERVING}
        tasks = await self._tasks.list()
        by_job: dict[str, list[Versioned[TaskRecord]]] = defaultdict(list)
        for task in tasks:
            by_job[task.record.job_id].append(task)
        by_task = {i.task_id: i for i in instances.values() if i.task_id}
        for job in jobs:
            try:
                await self._reconcile_job(job, by_job.pop(job.record.job_id, []), pods, by_task)
            except Conflict:
                log.info("job %s changed during the pass; next pass", job.record.job_id)
        for job_id, leftovers in by_job.items():  # tasks whose job record is gone
            if job_id in other_jobs:
                continue
            for task in leftovers:
                self._spawn(task.record.task_id, self._remove(task, pods, f"job {job_id} is gone"))
        task_ids = {t.record.task_id for t in tasks}
        for pod in pods.values():
            if pod.state == PodState.ASSIGNED and pod.task_id and pod.task_id not in task_ids:
                self._spawn(f"orphan:{pod.pod_id}", self._release_orphan(pod))
        self.passes += 1

    async def _instance_registered(self, task: TaskRecord) -> bool:
        """Asks etcd itself before declaring an instance lost (the watch may not have caught up)."""
        if not task.instance_id:
            return False
        store = self._instance_mirror.store
        return await store.get(Keys.instance(task.instance_id)) is not None

    async def _reconcile_job(
        self,
        job: Versioned[JobRecord],
        tasks: list[Versioned[TaskRecord]],
        pods: dict[str, PodRecord],
        instance_by_task: dict[str, InstanceRecord],
    ) -> None:
        record = job.record
        assert record.serving is not None
        job_id = record.job_id
        stopping = record.status.phase.terminal or record.delete_requested
        desired = {s.name: s for s in ([] if stopping else desired_slots(record.serving))}
        events: list[tuple[str, str]] = []
        occupied: dict[str, TaskRecord] = {}
        for task in sorted(tasks, key=lambda t: t.record.created_at):
            rec = task.record
            if rec.task_id in self._ops:
                placing = rec.task_id not in self._removing
                if placing and rec.state not in (TaskState.TERMINATING, TaskState.FAILED):
                    occupied.setdefault(rec.slot, rec)
                continue
            if (
                rec.slot not in desired
                or rec.slot in occupied
                or rec.state == TaskState.TERMINATING
            ):
                why = "job is stopping" if stopping else f"slot {rec.slot} is not wanted"
                self._spawn(rec.task_id, self._remove(task, pods, why))
                continue
            instance = instance_by_task.get(rec.task_id)
            if instance is not None:
                if rec.state != TaskState.RUNNING or rec.instance_id != instance.instance_id:
                    await self._mark_running(rec, instance)
                    rec = rec.model_copy(update={"state": TaskState.RUNNING})
                self._failures.pop((job_id, rec.slot), None)
                occupied[rec.slot] = rec
                continue
            if rec.state == TaskState.RUNNING and await self._instance_registered(rec):
                # The mirror lags etcd: the instance registered but its event is not here yet.
                occupied[rec.slot] = rec
                continue
            if rec.state == TaskState.RUNNING:
                message = (
                    f"instance {rec.instance_id or '?'} vanished: pod {rec.pod_id or '?'} died "
                    "or lost its lease"
                )
                await self._set_state(rec, TaskState.FAILED, "InstanceLost", message)
                events.append(("TaskFailed", f"{rec.task_id} ({rec.slot}): {message}"))
                self._note_failure(job_id, rec.slot, first_is_free=True)
                self._spawn(rec.task_id, self._remove(task, pods, "replacing a failed task"))
                continue
            if rec.state == TaskState.FAILED:
                self._spawn(rec.task_id, self._remove(task, pods, "replacing a failed task"))
                continue
            # PENDING or STARTING with nothing in flight (a new leader, or a lost reply):
            # placing is idempotent per task, so simply place it (again).
            occupied[rec.slot] = rec
            self._spawn(rec.task_id, self._place(rec))
        for name, slot in desired.items():
            if name in occupied or not self._may_retry(job_id, name):
                continue
            task = TaskRecord(
                task_id=new_task_id(job_id, slot),
                job_id=job_id,
                slot=name,
                replica=slot.replica,
                role=slot.role,
                model=record.serving.model,
                tensor_parallel_size=record.serving.tensor_parallel_size,
                created_by=self.actor,
            )
            task.record_event("Created", f"slot {name} of {record.serving.model}")
            await self._tasks.create(task)
            occupied[name] = task
            events.append(("TaskCreated", f"{task.task_id} for slot {name} ({slot.role.value})"))
            self._spawn(task.task_id, self._place(task))
        await self._write_status(job, desired, occupied, events, has_tasks=bool(tasks))

    async def _write_status(
        self,
        job: Versioned[JobRecord],
        desired: dict[str, TaskSlot],
        occupied: dict[str, TaskRecord],
        events: list[tuple[str, str]],
        *,
        has_tasks: bool,
    ) -> None:
        record = job.record
        assert record.serving is not None
        job_id = record.job_id
        if record.delete_requested and not has_tasks and not self._ops_of(job_id):
            with contextlib.suppress(Conflict):
                await self._jobs.remove(job)
                self._event_writers.pop(job_id, None)
                log.info("job deleted", extra={"fields": {"job_id": job_id}})
            return
        replicas = {s.replica for s in desired.values()}
        ready = sum(
            1
            for r in replicas
            if all(
                name in occupied and occupied[name].state == TaskState.RUNNING
                for name, s in desired.items()
                if s.replica == r
            )
        )
        if record.status.phase.terminal:
            phase = record.status.phase
            message = record.status.message
        else:
            wanted = record.serving.replicas
            phase = JobPhase.RUNNING if ready > 0 or wanted == 0 else JobPhase.PENDING
            message = f"{ready}/{wanted} replicas ready"
        if not events and (phase, ready, message) == (
            record.status.phase,
            record.status.ready_replicas,
            record.status.message,
        ):
            return

        def apply(job: JobRecord) -> JobRecord:
            for reason, text in events:
                job.record_event(reason, text)
            if not job.status.phase.terminal:
                if job.status.ready_replicas != ready:
                    job.record_event("ReplicasReady", message)
                if job.status.phase != phase:
                    job.record_event(phase.value.capitalize(), message)
                job.status.phase = phase
                job.status.message = message
            job.status.ready_replicas = ready
            return job

        await self._jobs.update(job_id, apply)

    # --- background operations -------------------------------------------------------------

    def _spawn(self, key: str, coro: Coroutine[Any, Any, None]) -> None:
        if key in self._ops:
            coro.close()
            return
        op = asyncio.create_task(coro, name=f"jobmgr-op:{key}")
        self._ops[key] = op
        if coro.__name__ in ("_remove", "_release_orphan"):
            self._removing.add(key)

        def done(_: asyncio.Task[None]) -> None:
            self._ops.pop(key, None)
            self._removing.discard(key)
            self.wake.set()
            if not op.cancelled() and op.exception() is not None:
                log.error("operation %s failed", key, exc_info=op.exception())

        op.add_done_callback(done)

    def _ops_of(self, job_id: str) -> bool:
        return any(key.startswith(f"{job_id}-") for key in self._ops)

    @property
    def event_writes(self) -> int:
        """Job-record writes that carried operations' events (each carries every queued one)."""
        return sum(w.flushes for w in self._event_writers.values())

    @property
    def operations_in_flight(self) -> int:
        return len(self._ops)

    async def stop(self) -> None:
        """Cancels every operation in flight (on losing leadership or shutting down)."""
        ops = list(self._ops.values())
        for op in ops:
            op.cancel()
        for op in ops:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await op

    async def _place(self, task: TaskRecord) -> None:
        job_id, task_id = task.job_id, task.task_id

        def starting(t: TaskRecord) -> TaskRecord | None:
            if t.state not in (TaskState.PENDING, TaskState.STARTING):
                return None
            if t.state == TaskState.PENDING:
                t.state = TaskState.STARTING
                t.record_event("Scheduling", "asking the pod pool for a pod")
            return t

        current = await self._tasks.update(job_id, task_id, starting)
        if current is None or current.record.state != TaskState.STARTING:
            return
        ask = PodAsk(task_id, job_id, task.model, task.role, task.tensor_parallel_size)
        try:
            # One trace per scale-up: jobmgr -> podpool (step 1) -> the pod (steps 2-5).
            with tracer.start_as_current_span(
                "scale_up",
                attributes={
                    "deepserve.job_id": job_id,
                    "deepserve.task_id": task_id,
                    "deepserve.model": task.model,
                },
            ):
                grant = await asyncio.wait_for(self._pods.acquire(ask), self._acquire_timeout_s)
        except (DeepServeError, TimeoutError) as exc:
            message = str(exc) or type(exc).__name__
            await self._set_state(task, TaskState.FAILED, "StartFailed", message)
            await self._job_event(job_id, "TaskStartFailed", f"{task_id}: {message}")
            self._note_failure(job_id, task.slot)
            return
        observe_scale_up(grant.timeline)
        how = (
            f"cold start: no warm pod was free, started pod {grant.pod_id}"
            if grant.cold_start
            else f"warm pod {grant.pod_id}"
        )
        detail = f"{how} (claimed in {grant.claim_seconds:.2f}s, model loaded in {grant.load_seconds:.2f}s)"

        def placed(t: TaskRecord) -> TaskRecord | None:
            if t.state == TaskState.RUNNING and t.instance_id == grant.instance_id:
                # A pass saw the instance register before this reply came: keep the timeline.
                if t.scale_up is not None or not grant.timeline.steps:
                    return None
                t.scale_up = grant.timeline
                t.record_event("ScaledUp", grant.timeline.summary())
                return t
            if t.state != TaskState.STARTING:
                return None
            t.state = TaskState.RUNNING
            t.pod_id, t.instance_id, t.address = grant.pod_id, grant.instance_id, grant.address
            t.cold_start = grant.cold_start
            t.scale_up = grant.timeline if grant.timeline.steps else None
            t.message = ""
            t.record_event("ColdStart" if grant.cold_start else "PodAssigned", detail)
            if grant.timeline.steps:
                t.record_event("ScaledUp", grant.timeline.summary())
            t.record_event("Running", f"instance {grant.instance_id} at {grant.address}")
            return t

        if await self._tasks.update(job_id, task_id, placed) is None:
            # The task was removed while its pod was loading: give the pod back.
            with contextlib.suppress(DeepServeError):
                await self._pods.release(grant.pod_id)
            return
        self._failures.pop((job_id, task.slot), None)
        reason = "ColdStart" if grant.cold_start else "TaskRunning"
        await self._job_event(job_id, reason, f"{task_id} ({task.slot}): {detail}")

    async def _remove(
        self, task: Versioned[TaskRecord], pods: dict[str, PodRecord], why: str
    ) -> None:
        rec = task.record
        failed = False

        def terminating(t: TaskRecord) -> TaskRecord | None:
            nonlocal failed
            if t.state == TaskState.TERMINATING:
                return None
            failed = t.state == TaskState.FAILED
            t.state = TaskState.TERMINATING
            t.record_event("Terminating", f"{why}: {t.message}" if failed else why)
            return t

        current = await self._tasks.update(rec.job_id, rec.task_id, terminating)
        if current is None:
            return
        for pod in pods.values():
            if pod.task_id == rec.task_id or (pod.pod_id == rec.pod_id and not pod.task_id):
                try:
                    # A pod whose task failed may be in any state: end it rather than reuse it.
                    await self._pods.release(pod.pod_id, terminate=failed)
                except DeepServeError as exc:
                    log.warning("release of %s failed (%s); next pass retries", pod.pod_id, exc)
                    return
        try:
            await self._tasks.delete(current)
        except Conflict:
            return
        reason = "TaskReplaced" if failed else "TaskRemoved"
        await self._job_event(rec.job_id, reason, f"{rec.task_id} ({rec.slot}): {why}")

    async def _release_orphan(self, pod: PodRecord) -> None:
        log.info("releasing orphan pod", extra={"fields": {"pod_id": pod.pod_id}})
        with contextlib.suppress(DeepServeError):
            await self._pods.release(pod.pod_id)

    # --- writes ----------------------------------------------------------------------------

    async def _mark_running(self, rec: TaskRecord, instance: InstanceRecord) -> None:
        def running(t: TaskRecord) -> TaskRecord | None:
            if t.state == TaskState.RUNNING and t.instance_id == instance.instance_id:
                return None
            t.state = TaskState.RUNNING
            t.instance_id, t.pod_id, t.address = (
                instance.instance_id,
                instance.pod_id,
                instance.address,
            )
            t.record_event("Running", f"instance {instance.instance_id} at {instance.address}")
            return t

        await self._tasks.update(rec.job_id, rec.task_id, running)

    async def _set_state(
        self, rec: TaskRecord, state: TaskState, reason: str, message: str
    ) -> None:
        def change(t: TaskRecord) -> TaskRecord | None:
            t.state = state
            t.message = message
            t.record_event(reason, message)
            return t

        await self._tasks.update(rec.job_id, rec.task_id, change)

    async def _job_event(self, job_id: str, reason: str, message: str) -> None:
        writer = self._event_writers.get(job_id)
        if writer is None:
            writer = self._event_writers[job_id] = Coalescer(partial(self._jobs.add_events, job_id))
        await writer.submit((reason, message))

    # --- retry backoff ---------------------------------------------------------------------

    def _note_failure(self, job_id: str, slot: str, *, first_is_free: bool = False) -> None:
        count = self._failures.get((job_id, slot), (0, 0.0))[0] + 1
        exponent = count - 2 if first_is_free else count - 1
        delay = 0.0 if exponent < 0 else min(self._backoff_s * 2**exponent, self._backoff_max_s)
        self._failures[(job_id, slot)] = (count, self._clock() + delay)

    def _may_retry(self, job_id: str, slot: str) -> bool:
        entry = self._failures.get((job_id, slot))
        return entry is None or self._clock() >= entry[1]

    def next_retry_in(self) -> float | None:
        """Seconds until the earliest backed-off slot may be retried (for the loop's sleep)."""
        now = self._clock()
        waits = [max(0.0, at - now) for _, at in self._failures.values() if at > now]
        return min(waits) if waits else None
