"""OpenAI fine-tuning routes: create, list, retrieve, cancel, events, checkpoints.

Every call goes to jobmgr's API (CreateJob checks the spec and the files, naming the field),
scoped to the caller's tenant; the JobRecord it returns becomes OpenAI's `fine_tuning.job`
shapes here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from deepserve.errors import DeepServeError, InvalidArgument, NotFound
from deepserve.gateway.auth import Caller
from deepserve.gateway.list_page import list_page
from deepserve.jobs.client import JobManagerClient
from deepserve.jobs.fine_tuning import (
    FineTuningSpec,
    Hyperparameters,
    Stage,
    fine_tuned_model_name,
)
from deepserve.jobs.records import JobKind, JobPhase, JobRecord

CallerDependency = Callable[..., Awaitable[Caller]]


class HyperparametersBody(BaseModel):
    """OpenAI accepts numbers or "auto"; "auto" means the default."""

    n_epochs: int | str = "auto"
    batch_size: int | str = "auto"
    learning_rate_multiplier: float | str = "auto"


class CreateFineTuningJobBody(BaseModel):
    """POST /v1/fine_tuning/jobs."""

    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: HyperparametersBody = Field(default_factory=HyperparametersBody)
    suffix: str | None = None
    seed: int | None = None
    metadata: dict[str, str] | None = None
    # DeepServe's own: also write the base with the adapter merged in (the adapter is served).
    export_merged_model: bool = False


def _number(value: Any, field: str) -> Any:
    if value == "auto":
        return 0
    if isinstance(value, str):
        raise InvalidArgument("must be a number or 'auto'", field=f"hyperparameters.{field}")
    return value


def _status(job: JobRecord) -> str:
    assert job.fine_tuning is not None
    phase = job.status.phase
    if phase == JobPhase.PENDING:
        return "queued"
    if phase == JobPhase.RUNNING:
        stage = job.fine_tuning.progress.stage
        return "validating_files" if stage == Stage.PREPROCESS else "running"
    return phase.value


def job_json(job: JobRecord) -> dict[str, Any]:
    """The OpenAI `fine_tuning.job` object."""
    assert job.fine_tuning is not None
    spec, progress = job.fine_tuning.spec, job.fine_tuning.progress
    error = None
    if job.status.phase == JobPhase.FAILED:
        error = {
            "code": progress.error_code or "failed",
            "message": progress.error_message or job.status.message,
            "param": progress.error_param or None,
        }
    hp = spec.hyperparameters
    return {
        "id": job.job_id,
        "object": "fine_tuning.job",
        "created_at": int(job.created_at),
        "finished_at": int(progress.finished_at) if progress.finished_at else None,
        "model": spec.model,
        "fine_tuned_model": progress.fine_tuned_model or None,
        "organization_id": spec.tenant or "deepserve",
        "result_files": [],
        "status": _status(job),
        "training_file": spec.training_file,
        "validation_file": spec.validation_file or None,
        "hyperparameters": {
            "n_epochs": hp.n_epochs,
            "batch_size": hp.batch_size,
            "learning_rate_multiplier": hp.learning_rate_multiplier,
        },
        "trained_tokens": progress.trained_tokens or None,
        "error": error,
        "seed": spec.seed,
        "user_provided_suffix": spec.suffix or None,
        "estimated_finish": None,
        "integrations": [],
        "metadata": spec.metadata,
        "method": {
            "type": "supervised",
            "supervised": {"hyperparameters": {**hp.model_dump()}},
        },
    }


def events_json(job: JobRecord) -> list[dict[str, Any]]:
    """Job events and step metrics as OpenAI `fine_tuning.job.event`s, newest first."""
    assert job.fine_tuning is not None
    progress = job.fine_tuning.progress
    metrics = {m.step: m for m in progress.metrics}
    out = []
    for index, event in enumerate(job.events):
        data: dict[str, Any] = {}
        kind = "message"
        if event.reason == "TrainingStep":
            step = int(event.message.split("/", 1)[0].removeprefix("Step "))
            if step in metrics:
                kind = "metrics"
                data = {
                    "step": step,
                    "train_loss": metrics[step].train_loss,
                    "total_steps": progress.total_steps,
                }
        out.append(
            {
                "object": "fine_tuning.job.event",
                "id": f"ftevent-{job.job_id}-{index}",
                "created_at": int(event.at),
                "level": "error" if event.reason == "Failed" else "info",
                "message": event.message,
                "type": kind,
                "data": data,
            }
        )
    return out[::-1]


def checkpoints_json(job: JobRecord) -> list[dict[str, Any]]:
    assert job.fine_tuning is not None
    spec = job.fine_tuning.spec
    name = fine_tuned_model_name(spec.model, spec.suffix, job.job_id)
    return [
        {
            "object": "fine_tuning.job.checkpoint",
            "id": f"ftckpt-{job.job_id}-{c.step}",
            "created_at": int(c.at),
            "fine_tuned_model_checkpoint": f"{name}:ckpt-step-{c.step}",
            "step_number": c.step,
            "metrics": {"step": c.step, "train_loss": c.train_loss},
            "fine_tuning_job_id": job.job_id,
        }
        for c in reversed(job.fine_tuning.progress.checkpoints)
    ]


def fine_tuning_router(jobs: JobManagerClient, caller: CallerDependency) -> APIRouter:
    """The /v1/fine_tuning/jobs routes."""
    router = APIRouter()

    async def owned(job_id: str, who: Caller) -> JobRecord:
        with _named(job_id):
            return await jobs.get(job_id, tenant=who.tenant, kind=JobKind.FINE_TUNING)

    @router.post("/v1/fine_tuning/jobs")
    async def create_job(
        body: CreateFineTuningJobBody, who: Caller = Depends(caller)
    ) -> dict[str, Any]:
        hp = body.hyperparameters
        spec = FineTuningSpec(
            model=body.model,
            training_file=body.training_file,
            validation_file=body.validation_file or "",
            hyperparameters=Hyperparameters(
                n_epochs=_number(hp.n_epochs, "n_epochs"),
                batch_size=_number(hp.batch_size, "batch_size"),
                learning_rate_multiplier=_number(
                    hp.learning_rate_multiplier, "learning_rate_multiplier"
                ),
            ),
            suffix=body.suffix or "",
            seed=body.seed if body.seed is not None else 42,
            tenant=who.tenant,
            metadata=body.metadata,
            export_merged_model=body.export_merged_model,
        )
        return job_json(await jobs.create(spec))

    @router.get("/v1/fine_tuning/jobs")
    async def list_jobs(
        after: str | None = None, limit: int = 20, who: Caller = Depends(caller)
    ) -> dict[str, Any]:
        mine = await jobs.list(JobKind.FINE_TUNING, tenant=who.tenant)
        mine.sort(key=lambda j: j.created_at, reverse=True)
        return list_page([job_json(j) for j in mine], after, limit)

    @router.get("/v1/fine_tuning/jobs/{job_id}")
    async def retrieve_job(job_id: str, who: Caller = Depends(caller)) -> dict[str, Any]:
        return job_json(await owned(job_id, who))

    @router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str, who: Caller = Depends(caller)) -> dict[str, Any]:
        with _named(job_id):
            return job_json(await jobs.cancel(job_id, tenant=who.tenant, kind=JobKind.FINE_TUNING))

    @router.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def list_events(
        job_id: str, after: str | None = None, limit: int = 20, who: Caller = Depends(caller)
    ) -> dict[str, Any]:
        return list_page(events_json(await owned(job_id, who)), after, limit)

    @router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    async def list_checkpoints(
        job_id: str, after: str | None = None, limit: int = 10, who: Caller = Depends(caller)
    ) -> dict[str, Any]:
        return list_page(checkpoints_json(await owned(job_id, who)), after, limit)

    return router


@contextlib.contextmanager
def _named(job_id: str) -> Iterator[None]:
    """jobmgr names `job_id`; the OpenAI path parameter is `fine_tuning_job_id`."""
    try:
        yield
    except NotFound:
        raise NotFound(f"fine-tuning job {job_id} not found", field="fine_tuning_job_id") from None
    except DeepServeError as exc:
        if exc.field == "job_id":
            exc.field = "fine_tuning_job_id"
        raise
