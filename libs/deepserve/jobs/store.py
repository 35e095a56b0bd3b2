"""Jobs in etcd: create, read, list, watch, cancel, scale — every change by compare-and-swap.

jobmgr is the one process that writes job records (its API and its controllers); everyone
else reads them, or changes them through JobManagerService.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from deepserve.errors import (
    AlreadyExists,
    Conflict,
    DeepServeError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from deepserve.jobs.batch import BatchJob, BatchProgress, BatchSpec
from deepserve.jobs.fine_tuning import FineTuningJob, FineTuningSpec
from deepserve.jobs.records import JobKind, JobPhase, JobRecord, ServingSpec
from deepserve.store.etcd import EtcdStore, TypedPrefix, Versioned
from deepserve.store.keys import Keys, last_segment


@dataclass(frozen=True, slots=True)
class JobChange:
    kind: str  # "put" or "delete"
    job: Versioned[JobRecord] | None
    job_id: str


class JobStore:
    """The jobs under /deepserve/jobs/; a `Versioned` carries the revision for the next CAS."""

    def __init__(self, store: EtcdStore) -> None:
        self._jobs = TypedPrefix(store, Keys.jobs_prefix(), JobRecord, Keys.job)
        self._store = store

    async def create_serving(self, spec: ServingSpec, job_id: str = "") -> Versioned[JobRecord]:
        spec = spec.normalized()
        job = JobRecord(
            job_id=job_id or f"job-{uuid.uuid4().hex[:10]}", kind=JobKind.SERVING, serving=spec
        )
        job.record_event(
            "Created",
            f"deploy {spec.model}: {spec.replicas} replica(s) in [{spec.min_replicas}, "
            f"{spec.max_replicas}], {spec.mode.value}, policy {spec.policy.value}",
        )
        return await self._create(job)

    async def create_fine_tuning(
        self, spec: FineTuningSpec, job_id: str = ""
    ) -> Versioned[JobRecord]:
        """A fine-tuning job over already checked files (jobmgr's admission checks them)."""
        spec = spec.normalized()
        job = JobRecord(
            job_id=job_id or f"ftjob-{uuid.uuid4().hex[:20]}",
            kind=JobKind.FINE_TUNING,
            fine_tuning=FineTuningJob(spec=spec),
        )
        job.record_event("Created", f"fine-tune {spec.model} on {spec.training_file}")
        return await self._create(job)

    async def create_batch(
        self, spec: BatchSpec, total: int, job_id: str = ""
    ) -> Versioned[JobRecord]:
        """A batch over an already checked input file of `total` requests; its window starts now."""
        spec = spec.normalized()
        created_at = time.time()
        job = JobRecord(
            job_id=job_id or f"batch_{uuid.uuid4().hex[:24]}",
            kind=JobKind.BATCH,
            batch=BatchJob(
                spec=spec.with_deadline(created_at), progress=BatchProgress(total=total)
            ),
            created_at=created_at,
        )
        job.record_event("Created", f"batch over {spec.input_file_id} ({total} requests)")
        return await self._create(job)

    async def _create(self, job: JobRecord) -> Versioned[JobRecord]:
        try:
            revision = await self._jobs.create(job.job_id, job)
        except Conflict:
            raise AlreadyExists(f"job {job.job_id!r} already exists", field="job_id") from None
        return Versioned(Keys.job(job.job_id), job, revision)

    async def get(
        self, job_id: str, *, tenant: str | None = None, kind: JobKind | None = None
    ) -> Versioned[JobRecord]:
        """The job; with `tenant` (`kind`), one of another tenant (kind) is NotFound."""
        if not job_id:
            raise InvalidArgument("a job id is required", field="job_id")
        found = await self._jobs.get(job_id)
        if (
            found is None
            or (tenant is not None and found.record.tenant != tenant)
            or (kind is not None and found.record.kind != kind)
        ):
            raise NotFound(f"job {job_id!r} not found", field="job_id")
        return found

    async def list(
        self, kind: JobKind | None = None, *, tenant: str | None = None
    ) -> list[Versioned[JobRecord]]:
        jobs, _ = await self._jobs.list()
        return [
            j
            for j in jobs
            if (kind is None or j.record.kind == kind)
            and (tenant is None or j.record.tenant == tenant)
        ]

    async def cancel(
        self, job_id: str, *, tenant: str | None = None, kind: JobKind | None = None
    ) -> Versioned[JobRecord]:
        """Cancels the job. A serving or fine-tuning job ends cancelled at once; a batch is marked
        cancel_requested and its controller ends it with the partial results. Cancelling
        twice is a no-op; a completed or failed batch is refused (FailedPrecondition)."""
        current = await self.get(job_id, tenant=tenant, kind=kind)
        if current.record.kind == JobKind.BATCH:
            return await self._jobs.update(job_id, _request_batch_cancel)

        def mark(job: JobRecord) -> JobRecord | None:
            if job.status.phase.terminal:
                return None  # cancelling twice is a no-op, not an error
            job.status.phase = JobPhase.CANCELLED
            job.status.message = "cancelled by user"
            job.record_event("Cancelled", "cancel requested")
            return job

        return await self._jobs.update(job_id, mark)

    async def scale(self, job_id: str, replicas: int) -> Versioned[JobRecord]:
        current = await self.get(job_id)
        if current.record.kind != JobKind.SERVING or current.record.serving is None:
            raise FailedPrecondition(f"job {job_id!r} is not a serving job")

        def resize(job: JobRecord) -> JobRecord | None:
            assert job.serving is not None
            if job.status.phase.terminal:
                raise FailedPrecondition(f"job {job_id!r} is {job.status.phase.value}")
            spec = job.serving.model_copy(update={"replicas": replicas})
            spec.normalized()  # raises InvalidArgument naming `replicas` when out of bounds
            if spec.replicas == job.serving.replicas:
                return None
            job.record_event("Scaled", f"replicas {job.serving.replicas} -> {replicas}")
            job.serving = spec
            return job

        return await self._jobs.update(job_id, resize)

    async def delete(self, job_id: str) -> Versioned[JobRecord]:
        """Asks for the job to go: the reconciler stops its tasks, then removes the record."""
        await self.get(job_id)

        def mark(job: JobRecord) -> JobRecord | None:
            if job.delete_requested:
                return None
            job.delete_requested = True
            if not job.status.phase.terminal:
                job.status.phase = JobPhase.CANCELLED
                job.status.message = "deleted by user"
            job.record_event("DeleteRequested", "stopping tasks, then removing the job")
            return job

        return await self._jobs.update(job_id, mark)

    async def update(
        self, job_id: str, mutate: Callable[[JobRecord], JobRecord | None]
    ) -> Versioned[JobRecord]:
        """CAS read-modify-write of one job (the reconciler's status and event writes)."""
        return await self._jobs.update(job_id, mutate)

    async def add_event(self, job_id: str, reason: str, message: str) -> None:
        """Appends an event to the job's history; best effort (a gone job just has no event)."""

        def add(job: JobRecord) -> JobRecord:
            job.record_event(reason, message)
            return job

        with contextlib.suppress(DeepServeError):
            await self.update(job_id, add)

    async def add_events(self, job_id: str, events: list[tuple[str, str]]) -> list[None]:
        """Appends (reason, message) events in one write; best effort like `add_event`."""

        def add(job: JobRecord) -> JobRecord:
            for reason, message in events:
                job.record_event(reason, message)
            return job

        with contextlib.suppress(DeepServeError):
            await self.update(job_id, add)
        return [None] * len(events)

    async def remove(self, job: Versioned[JobRecord]) -> None:
        """Deletes the record if unchanged since `job` was read (else Conflict)."""
        await self._store.delete(job.key, expected_mod_revision=job.mod_revision)

    async def watch(self, kind: JobKind | None = None) -> AsyncIterator[JobChange]:
        """The current jobs as puts, then every change as it happens."""
        jobs, revision = await self._jobs.list()
        for job in jobs:
            if kind is None or job.record.kind == kind:
                yield JobChange("put", job, last_segment(job.key))
        async for event in self._store.watch_prefix(
            Keys.jobs_prefix(), start_revision=revision + 1
        ):
            job_id = last_segment(event.key)
            if event.kind == "delete":
                yield JobChange("delete", None, job_id)
                continue
            record = self._jobs.decode(event.value)
            if kind is None or record.kind == kind:
                yield JobChange("put", Versioned(event.key, record, event.mod_revision), job_id)


# OpenAI's names of the terminal phases a batch cannot be cancelled from.
_UNCANCELLABLE_BATCH = {JobPhase.SUCCEEDED: "completed", JobPhase.FAILED: "failed"}


def _request_batch_cancel(job: JobRecord) -> JobRecord | None:
    """Marks the batch cancel_requested; the batch controller stops sending and finishes it."""
    assert job.batch is not None
    if job.status.phase in _UNCANCELLABLE_BATCH:
        raise FailedPrecondition(
            f"Cannot cancel a batch with status {_UNCANCELLABLE_BATCH[job.status.phase]!r}",
            field="job_id",
        )
    if job.status.phase.terminal or job.batch.progress.cancel_requested:
        return None  # cancelling twice is a no-op
    job.batch.progress.cancel_requested = True
    job.batch.progress.cancelling_at = time.time()
    job.record_event("Cancelling", "cancel requested: no further requests are sent")
    return job
