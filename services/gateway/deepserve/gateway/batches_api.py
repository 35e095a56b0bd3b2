"""OpenAI Batch API routes: create, retrieve, list, cancel.

A create checks the input file and writes a BATCH job into etcd (the jobmgr leader's batch
controller picks it up); reads turn the JobRecord into OpenAI's `batch` object.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from deepserve.errors import FailedPrecondition, InvalidArgument, NotFound
from deepserve.files import FilePurpose, FileService
from deepserve.gateway.auth import Caller
from deepserve.gateway.list_page import list_page
from deepserve.jobs.batch import BatchJob, BatchSpec, BatchStage
from deepserve.jobs.records import JobKind, JobPhase, JobRecord
from deepserve.jobs.store import JobStore
from deepserve.store.etcd import EtcdStore, TypedPrefix
from deepserve.store.keys import Keys

CallerDependency = Callable[..., Awaitable[Caller]]


class CreateBatchBody(BaseModel):
    """POST /v1/batches."""

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None


def _status(job: JobRecord) -> str:
    assert job.batch is not None
    phase, progress = job.status.phase, job.batch.progress
    if phase == JobPhase.SUCCEEDED:
        return "completed"
    if phase in (JobPhase.FAILED, JobPhase.CANCELLED, JobPhase.EXPIRED):
        return phase.value
    if progress.cancel_requested:
        return "cancelling"
    if progress.stage == BatchStage.DONE:
        return "finalizing"
    return progress.stage.value


def _seconds(at: float | None) -> int | None:
    return int(at) if at else None


def batch_json(job: JobRecord) -> dict[str, Any]:
    """The OpenAI `batch` object."""
    assert job.batch is not None
    spec, progress = job.batch.spec, job.batch.progress
    errors = {"object": "list", "data": progress.errors} if progress.errors else None
    return {
        "id": job.job_id,
        "object": "batch",
        "endpoint": spec.endpoint,
        "errors": errors,
        "input_file_id": spec.input_file_id,
        "completion_window": spec.completion_window,
        "status": _status(job),
        "output_file_id": progress.output_file_id or None,
        "error_file_id": progress.error_file_id or None,
        "created_at": int(job.created_at),
        "in_progress_at": _seconds(progress.in_progress_at),
        "expires_at": int(spec.expires_at) if spec.expires_at else None,
        "finalizing_at": _seconds(progress.finalizing_at),
        "completed_at": _seconds(progress.completed_at),
        "failed_at": _seconds(progress.failed_at),
        "expired_at": _seconds(progress.expired_at),
        "cancelling_at": _seconds(progress.cancelling_at),
        "cancelled_at": _seconds(progress.cancelled_at),
        "request_counts": {
            "total": progress.total,
            "completed": progress.completed,
            "failed": progress.failed,
        },
        "metadata": spec.metadata,
    }


def batches_router(etcd: EtcdStore, files: FileService, caller: CallerDependency) -> APIRouter:
    """The /v1/batches routes."""
    router = APIRouter()
    jobs = JobStore(etcd)
    records = TypedPrefix(etcd, Keys.jobs_prefix(), JobRecord, Keys.job)

    async def owned(batch_id: str, who: Caller) -> JobRecord:
        found = await records.get(batch_id) if batch_id else None
        if (
            found is None
            or found.record.batch is None
            or found.record.batch.spec.tenant != who.tenant
        ):
            raise NotFound(f"No batch found with id '{batch_id}'", field="batch_id")
        return found.record

    @router.post("/v1/batches")
    async def create_batch(body: CreateBatchBody, who: Caller = Depends(caller)) -> dict[str, Any]:
        spec = BatchSpec(
            input_file_id=body.input_file_id,
            endpoint=body.endpoint,
            completion_window=body.completion_window,
            metadata=body.metadata,
            tenant=who.tenant,
        ).normalized()
        try:
            record = await files.get(spec.input_file_id, who.tenant)
        except NotFound:
            raise InvalidArgument(
                f"file {spec.input_file_id} does not exist", field="input_file_id"
            ) from None
        if record.purpose != FilePurpose.BATCH:
            raise InvalidArgument(
                f"file {record.file_id} has purpose {record.purpose.value!r}, not 'batch'",
                field="input_file_id",
            )
        job_id = f"batch_{uuid.uuid4().hex[:24]}"
        job = JobRecord(job_id=job_id, kind=JobKind.BATCH, batch=BatchJob(spec=spec))
        job.batch.spec = spec.with_deadline(job.created_at)  # type: ignore[union-attr]
        job.batch.progress.total = record.lines  # type: ignore[union-attr]
        job.record_event("Created", f"batch over {spec.input_file_id} ({record.lines} requests)")
        await records.create(job_id, job)
        return batch_json(job)

    @router.get("/v1/batches")
    async def list_batches(
        after: str | None = None, limit: int = 20, who: Caller = Depends(caller)
    ) -> dict[str, Any]:
        found = await jobs.list(JobKind.BATCH)
        mine = [
            j.record
            for j in found
            if j.record.batch is not None and j.record.batch.spec.tenant == who.tenant
        ]
        mine.sort(key=lambda j: (j.created_at, j.job_id), reverse=True)
        return list_page([batch_json(j) for j in mine], after, limit, with_ids=True)

    @router.get("/v1/batches/{batch_id}")
    async def retrieve_batch(batch_id: str, who: Caller = Depends(caller)) -> dict[str, Any]:
        return batch_json(await owned(batch_id, who))

    @router.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str, who: Caller = Depends(caller)) -> dict[str, Any]:
        await owned(batch_id, who)

        def cancelling(job: JobRecord) -> JobRecord | None:
            assert job.batch is not None
            if job.status.phase in (JobPhase.SUCCEEDED, JobPhase.FAILED):
                raise FailedPrecondition(
                    f"Cannot cancel a batch with status {_status(job)!r}", field="batch_id"
                )
            if job.status.phase.terminal or job.batch.progress.cancel_requested:
                return None  # cancelling twice is a no-op
            job.batch.progress.cancel_requested = True
            job.batch.progress.cancelling_at = time.time()
            job.record_event("Cancelling", "cancel requested: no further requests are sent")
            return job

        return batch_json((await jobs.update(batch_id, cancelling)).record)

    return router
