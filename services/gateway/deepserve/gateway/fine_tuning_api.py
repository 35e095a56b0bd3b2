"""OpenAI fine-tuning routes: create, list, retrieve, cancel, events, checkpoints.

A create writes a FINE_TUNING job into etcd (the jobmgr leader's watch picks it up); reads
turn the JobRecord into OpenAI's `fine_tuning.job` shapes.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from deepserve.errors import InvalidArgument, NotFound
from deepserve.files import FilePurpose, FileService
from deepserve.gateway.auth import Caller
from deepserve.gateway.list_page import list_page
from deepserve.jobs.fine_tuning import FineTuningJob, FineTuningSpec, Hyperparameters, Stage
from deepserve.jobs.records import JobKind, JobPhase, JobRecord
from deepserve.jobs.store import JobStore
from deepserve.store.etcd import EtcdStore, TypedPrefix
from deepserve.store.keys import Keys

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
        "metadata": None,
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
    from deepserve.jobs.fine_tuning import fine_tuned_model_name

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


def fine_tuning_router(etcd: EtcdStore, files: FileService, caller: CallerDependency) -> APIRouter:
    """The /v1/fine_tuning/jobs routes."""
    router = APIRouter()
    jobs = JobStore(etcd)
    records = TypedPrefix(etcd, Keys.jobs_prefix(), JobRecord, Keys.job)

    async def owned(job_id: str, who: Caller) -> JobRecord:
        found = await records.get(job_id)
        if (
            found is None
            or found.record.fine_tuning is None
            or found.record.fine_tuning.spec.tenant != who.tenant
        ):
            raise NotFound(f"fine-tuning job {job_id} not found", field="fine_tuning_job_id")
        return found.record

    async def check_file(file_id: str, field: str, who: Caller) -> None:
        try:
            record = await files.get(file_id, who.tenant)
        except NotFound:
            raise InvalidArgument(f"file {file_id} does not exist", field=field) from None
        if record.purpose != FilePurpose.FINE_TUNE:
            raise InvalidArgument(
                f"file {file_id} has purpose {record.purpose.value!r}, not 'fine-tune'",
                field=field,
            )

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
        ).normalized()
        await check_file(spec.training_file, "training_file", who)
        if spec.validation_file:
            await check_file(spec.validation_file, "validation_file", who)
        job_id = f"ftjob-{uuid.uuid4().hex[:20]}"
        job = JobRecord(
            job_id=job_id, kind=JobKind.FINE_TUNING, fine_tuning=FineTuningJob(spec=spec)
        )
        job.record_event("Created", f"fine-tune {spec.model} on {spec.training_file}")
        await records.create(job_id, job)
        return job_json(job)

    @router.get("/v1/fine_tuning/jobs")
    async def list_jobs(
        after: str | None = None, limit: int = 20, who: Caller = Depends(caller)
    ) -> dict[str, Any]:
        found = await jobs.list(JobKind.FINE_TUNING)
        mine = [
            j.record
            for j in found
            if j.record.fine_tuning is not None and j.record.fine_tuning.spec.tenant == who.tenant
        ]
        mine.sort(key=lambda j: j.created_at, reverse=True)
        return list_page([job_json(j) for j in mine], after, limit)

    @router.get("/v1/fine_tuning/jobs/{job_id}")
    async def retrieve_job(job_id: str, who: Caller = Depends(caller)) -> dict[str, Any]:
        return job_json(await owned(job_id, who))

    @router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str, who: Caller = Depends(caller)) -> dict[str, Any]:
        await owned(job_id, who)
        return job_json((await jobs.cancel(job_id)).record)

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
