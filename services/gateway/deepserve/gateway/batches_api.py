"""OpenAI Batch API routes: create, retrieve, list, cancel.

Every call goes to jobmgr's API (CreateJob checks the spec and the input file, naming the
field; CancelJob marks the batch for its controller), scoped to the caller's tenant; the
JobRecord it returns becomes OpenAI's `batch` object here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from deepserve.errors import DeepServeError, NotFound
from deepserve.gateway.auth import Caller
from deepserve.gateway.list_page import list_page
from deepserve.jobs.batch import BatchSpec, BatchStage
from deepserve.jobs.client import JobManagerClient
from deepserve.jobs.records import JobKind, JobPhase, JobRecord

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
    errors = (
        {"object": "list", "data": [e.model_dump() for e in progress.errors]}
        if progress.errors
        else None
    )
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


def batches_router(jobs: JobManagerClient, caller: CallerDependency) -> APIRouter:
    """The /v1/batches routes."""
    router = APIRouter()

    @router.post("/v1/batches")
    async def create_batch(body: CreateBatchBody, who: Caller = Depends(caller)) -> dict[str, Any]:
        spec = BatchSpec(
            input_file_id=body.input_file_id,
            endpoint=body.endpoint,
            completion_window=body.completion_window,
            metadata=body.metadata,
            tenant=who.tenant,
        )
        return batch_json(await jobs.create(spec))

    @router.get("/v1/batches")
    async def list_batches(
        after: str | None = None, limit: int = 20, who: Caller = Depends(caller)
    ) -> dict[str, Any]:
        mine = await jobs.list(JobKind.BATCH, tenant=who.tenant)
        mine.sort(key=lambda j: (j.created_at, j.job_id), reverse=True)
        return list_page([batch_json(j) for j in mine], after, limit, with_ids=True)

    @router.get("/v1/batches/{batch_id}")
    async def retrieve_batch(batch_id: str, who: Caller = Depends(caller)) -> dict[str, Any]:
        with _named(batch_id):
            return batch_json(await jobs.get(batch_id, tenant=who.tenant, kind=JobKind.BATCH))

    @router.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str, who: Caller = Depends(caller)) -> dict[str, Any]:
        with _named(batch_id):
            return batch_json(await jobs.cancel(batch_id, tenant=who.tenant, kind=JobKind.BATCH))

    return router


@contextlib.contextmanager
def _named(batch_id: str) -> Iterator[None]:
    """jobmgr names `job_id`; the OpenAI path parameter is `batch_id`."""
    try:
        yield
    except NotFound:
        raise NotFound(f"No batch found with id '{batch_id}'", field="batch_id") from None
    except DeepServeError as exc:
        if exc.field == "job_id":
            exc.field = "batch_id"
        raise
