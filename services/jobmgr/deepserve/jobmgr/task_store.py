"""Tasks in etcd under /deepserve/tasks/<job id>/<task id>; every change by compare-and-swap."""

from __future__ import annotations

from collections.abc import Callable

from deepserve.errors import NotFound
from deepserve.jobmgr.task_records import TaskRecord
from deepserve.store.etcd import EtcdStore, TypedPrefix, Versioned
from deepserve.store.keys import Keys


class TaskStore:
    """Reads and writes task records; a `Versioned` carries the revision for the next CAS."""

    def __init__(self, store: EtcdStore) -> None:
        self._store = store
        self._all = TypedPrefix(store, Keys.tasks_prefix(), TaskRecord, _no_single_key)

    def _of_job(self, job_id: str) -> TypedPrefix[TaskRecord]:
        return TypedPrefix(
            self._store,
            Keys.tasks_prefix(job_id),
            TaskRecord,
            lambda task_id: Keys.task(job_id, task_id),
        )

    async def list(self, job_id: str | None = None) -> list[Versioned[TaskRecord]]:
        tasks, _ = await (self._of_job(job_id) if job_id else self._all).list()
        return sorted(tasks, key=lambda t: (t.record.job_id, t.record.slot, t.record.created_at))

    async def get(self, job_id: str, task_id: str) -> Versioned[TaskRecord] | None:
        return await self._of_job(job_id).get(task_id)

    async def create(self, task: TaskRecord) -> Versioned[TaskRecord]:
        revision = await self._of_job(task.job_id).create(task.task_id, task)
        return Versioned(Keys.task(task.job_id, task.task_id), task, revision)

    async def update(
        self, job_id: str, task_id: str, mutate: Callable[[TaskRecord], TaskRecord | None]
    ) -> Versioned[TaskRecord] | None:
        """CAS read-modify-write; None when the task no longer exists."""
        try:
            return await self._of_job(job_id).update(task_id, mutate)
        except NotFound:
            return None

    async def delete(self, task: Versioned[TaskRecord]) -> None:
        """Deletes the task if unchanged since it was read (else Conflict)."""
        await self._store.delete(task.key, expected_mod_revision=task.mod_revision)


def _no_single_key(name: str) -> str:
    raise ValueError("the all-tasks view is read-only; write through a job's prefix")
