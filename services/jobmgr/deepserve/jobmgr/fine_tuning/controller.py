"""Drives fine-tuning jobs through their stages on the jobmgr leader.

Level-triggered like the serving reconciler: each pass starts one background operation per
unfinished job, which continues from the stage recorded in the job (so a new leader resumes
where the last one stopped, training from the last checkpoint). A terminal job's tasks are
removed and their pods released; cancelling a job cancels its operation, which cancels the
RunTraining call, which stops the pod's training before its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from deepserve import records
from deepserve.adapters.records import AdapterRecord
from deepserve.config import CommonSettings
from deepserve.errors import (
    DeepServeError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from deepserve.files import FileService
from deepserve.jobmgr.adapter_registry import AdapterRegistry
from deepserve.jobmgr.fine_tuning.preprocess import build_dataset
from deepserve.jobmgr.fine_tuning.trainer_client import run_training
from deepserve.jobmgr.job_operations import JobOperations
from deepserve.jobmgr.pod_provider import PodAsk, PodProvider
from deepserve.jobmgr.task_records import TaskRecord, TaskState
from deepserve.jobmgr.task_store import TaskStore
from deepserve.jobs.fine_tuning import (
    Checkpoint,
    FineTuningJob,
    Stage,
    StepMetric,
    fine_tuned_model_name,
)
from deepserve.jobs.records import JobKind, JobPhase, JobRecord
from deepserve.jobs.store import JobStore
from deepserve.models.catalog import default_cache_dir, resolve_model
from deepserve.records import ModelRecord, PodPurpose, PodRecord, Role
from deepserve.store.etcd import EtcdStore
from deepserve.tokenizer import Tokenizer
from deepserve.v1 import flowserve_pb2

log = logging.getLogger(__name__)

# Errors that mean the job itself is wrong (fail it), rather than the platform (retry).
FATAL_ERRORS = (InvalidArgument, NotFound, FailedPrecondition)
TRAIN_SLOT = "train"
PREPROCESS_SLOT = "preprocess"


def dataset_artifact(job_id: str) -> str:
    return f"fine_tuning/{job_id}/dataset.json"


class FineTuningController:
    """Runs the stages of every fine-tuning job while this jobmgr replica leads."""

    def __init__(
        self,
        store: EtcdStore,
        pods: PodProvider,
        pod_items: Callable[[], Mapping[str, PodRecord]],
        files: FileService,
        *,
        actor: str = "",
        model_cache_dir: Path | None = None,
        adapters: AdapterRegistry | None = None,
    ) -> None:
        self._jobs = JobStore(store)
        self._tasks = TaskStore(store)
        self._models = records.models(store)
        self._pods = pods
        self._pod_items = pod_items
        self._files = files
        self._actor = actor
        self._cache_dir = model_cache_dir or default_cache_dir()
        self._adapters = adapters or AdapterRegistry(
            store, model_cache_dir=self._cache_dir, max_rank=CommonSettings().lora_max_rank
        )
        self._ops = JobOperations("fine-tuning")
        self.wake = self._ops.wake

    # --- passes ----------------------------------------------------------------------------

    async def reconcile(self) -> None:
        for job in await self._jobs.list(JobKind.FINE_TUNING):
            rec = job.record
            op = self._ops.get(rec.job_id)
            if rec.status.phase.terminal or rec.delete_requested:
                if op is not None:
                    op.cancel()  # cancels RunTraining: the pod stops before its next step
                elif await self._tasks.list(rec.job_id):
                    self._ops.spawn(rec.job_id, self._clean_up(rec.job_id))
                continue
            if op is None and rec.fine_tuning is not None:
                self._ops.spawn(rec.job_id, self._drive(rec.job_id))

    async def stop(self) -> None:
        await self._ops.stop()

    # --- stages ----------------------------------------------------------------------------

    async def _drive(self, job_id: str) -> None:
        try:
            while True:
                job = (await self._jobs.get(job_id)).record
                if job.status.phase.terminal or job.fine_tuning is None:
                    return
                stage = job.fine_tuning.progress.stage
                if stage == Stage.PREPROCESS:
                    await self._preprocess(job)
                elif stage == Stage.TRAIN:
                    await self._train(job)
                elif stage == Stage.EVALUATE:
                    await self._evaluate(job)
                elif stage == Stage.REGISTER:
                    await self._register(job)
                else:
                    return
                after = (await self._jobs.get(job_id)).record.fine_tuning
                if after is None or after.progress.stage == stage:
                    return  # no progress (e.g. the pod went away): the next pass retries
        except FATAL_ERRORS as exc:
            await self._fail(job_id, exc)

    async def _preprocess(self, job: JobRecord) -> None:
        assert job.fine_tuning is not None
        spec = job.fine_tuning.spec
        task = await self._task(job, PREPROCESS_SLOT)

        def starting(j: JobRecord, ft: FineTuningJob) -> None:
            j.status.phase = JobPhase.RUNNING
            j.status.message = "validating files"
            ft.progress.started_at = ft.progress.started_at or time.time()
            j.record_event("Preprocessing", f"validating {spec.training_file}, tokenizing")

        await self._update(job.job_id, starting)
        try:
            training = await self._files.get(spec.training_file, spec.tenant)
            train_bytes = await self._files.content(spec.training_file, spec.tenant)
        except NotFound:
            raise InvalidArgument(
                f"training file {spec.training_file} does not exist", field="training_file"
            ) from None
        validation = None
        if spec.validation_file:
            try:
                valid_bytes = await self._files.content(spec.validation_file, spec.tenant)
            except NotFound:
                raise InvalidArgument(
                    f"validation file {spec.validation_file} does not exist",
                    field="validation_file",
                ) from None
            validation = (spec.validation_file, valid_bytes)
        try:
            model_dir = resolve_model(spec.model, self._cache_dir)
        except DeepServeError as exc:
            raise InvalidArgument(exc.message, field="model") from None
        tokenizer = await asyncio.to_thread(Tokenizer.from_model_dir, model_dir)
        dataset = await asyncio.to_thread(
            build_dataset,
            tokenizer,
            (training.file_id, train_bytes),
            validation,
            split=spec.validation_split,
            seed=spec.seed,
        )
        artifact = dataset_artifact(job.job_id)
        await asyncio.to_thread(self._files.blobs.put_artifact, artifact, dataset.to_json())
        steps = spec.hyperparameters.n_epochs * math.ceil(
            len(dataset.train) / spec.hyperparameters.batch_size
        )

        def preprocessed(j: JobRecord, ft: FineTuningJob) -> None:
            ft.progress.dataset_artifact = artifact
            ft.progress.train_examples = len(dataset.train)
            ft.progress.valid_examples = len(dataset.valid)
            ft.progress.total_steps = steps
            ft.progress.stage = Stage.TRAIN
            j.status.message = "waiting for a pod to train on"
            j.record_event(
                "Preprocessed",
                f"{len(dataset.train)} training and {len(dataset.valid)} validation examples, "
                f"{dataset.train_tokens} training tokens, {steps} steps",
            )

        await self._update(job.job_id, preprocessed)
        await self._drop_task(task)

    async def _train(self, job: JobRecord) -> None:
        assert job.fine_tuning is not None
        spec, progress = job.fine_tuning.spec, job.fine_tuning.progress
        task = await self._task(job, TRAIN_SLOT)
        address = self._live_pod_address(task)
        if address is None:
            grant = await self._pods.acquire(
                PodAsk(
                    task.task_id,
                    job.job_id,
                    spec.model,
                    Role.COLOCATED,
                    purpose=PodPurpose.TRAINING,
                )
            )
            address = grant.address

            def placed(t: TaskRecord) -> TaskRecord:
                t.state = TaskState.RUNNING
                t.pod_id, t.instance_id, t.address = grant.pod_id, grant.instance_id, address
                t.record_event("PodAssigned", f"pod {grant.pod_id} at {address}")
                return t

            await self._tasks.update(job.job_id, task.task_id, placed)
            await self._job_event(job.job_id, "PodAssigned", f"training on pod {grant.pod_id}")
        resume = progress.checkpoints[-1].artifact if progress.checkpoints else ""
        output = fine_tuned_model_name(spec.model, spec.suffix, job.job_id)
        request = flowserve_pb2.RunTrainingRequest(
            job_id=job.job_id,
            base_model=spec.model,
            dataset_artifact=progress.dataset_artifact,
            output_model=output,
            n_epochs=spec.hyperparameters.n_epochs,
            batch_size=spec.hyperparameters.batch_size,
            learning_rate=spec.learning_rate,
            lora_rank=spec.lora_rank,
            lora_alpha=spec.lora_alpha,
            seed=spec.seed,
            checkpoint_every_steps=spec.checkpoint_every_steps,
            checkpoint_prefix=f"fine_tuning/{job.job_id}/checkpoints",
            resume_checkpoint=resume,
            adapter_only=not spec.export_merged_model,
        )

        def running(j: JobRecord, ft: FineTuningJob) -> None:
            j.status.message = "training"
            if resume:
                j.record_event("Resumed", f"resuming from {resume}")
            else:
                j.record_event("Training", f"LoRA rank {spec.lora_rank} on {spec.model}")

        await self._update(job.job_id, running)
        async for reply in run_training(address, request):
            await self._update(job.job_id, lambda j, ft, r=reply: _apply(j, ft, r))  # type: ignore[misc]
        await self._release_task(job.job_id, TRAIN_SLOT)

    async def _evaluate(self, job: JobRecord) -> None:
        assert job.fine_tuning is not None
        before = job.fine_tuning.progress.valid_loss_before
        after = job.fine_tuning.progress.valid_loss_after

        def evaluated(j: JobRecord, ft: FineTuningJob) -> None:
            if before is not None and after is not None:
                change = "improved" if after < before else "did not improve"
                j.record_event(
                    "Evaluated", f"validation loss {before:.4f} -> {after:.4f} ({change})"
                )
            ft.progress.stage = Stage.REGISTER

        await self._update(job.job_id, evaluated)

    async def _register(self, job: JobRecord) -> None:
        assert job.fine_tuning is not None
        spec, progress = job.fine_tuning.spec, job.fine_tuning.progress
        name = fine_tuned_model_name(spec.model, spec.suffix, job.job_id)
        if progress.adapter_dir:
            # Served at once by the base model's running instances: no new instance.
            await self._adapters.register(
                AdapterRecord(
                    name=name,
                    tenant=spec.tenant,
                    base_model=spec.model,
                    path=progress.adapter_dir,
                    rank=spec.lora_rank,
                    source="fine_tuning",
                    job_id=job.job_id,
                ),
                replace=True,  # a new leader may register it again
            )
        if progress.merged_model_dir:
            await self._models.put(
                name,
                ModelRecord(model_id=name, source=progress.merged_model_dir, owned_by=spec.tenant),
            )

        def succeeded(j: JobRecord, ft: FineTuningJob) -> None:
            ft.progress.fine_tuned_model = name
            ft.progress.stage = Stage.DONE
            ft.progress.finished_at = time.time()
            j.status.phase = JobPhase.SUCCEEDED
            j.status.message = f"model {name} registered"
            j.record_event("Succeeded", f"registered {name}")

        await self._update(job.job_id, succeeded)

    # --- tasks and pods --------------------------------------------------------------------

    async def _task(self, job: JobRecord, slot: str) -> TaskRecord:
        for found in await self._tasks.list(job.job_id):
            if found.record.slot == slot:
                return found.record
        assert job.fine_tuning is not None
        task = TaskRecord(
            task_id=f"{job.job_id}-{slot}",
            job_id=job.job_id,
            slot=slot,
            replica=0,
            role=Role.COLOCATED,
            model=job.fine_tuning.spec.model,
            state=TaskState.RUNNING if slot == PREPROCESS_SLOT else TaskState.PENDING,
            created_by=self._actor,
        )
        task.record_event("Created", f"{slot} stage")
        with contextlib.suppress(DeepServeError):
            await self._tasks.create(task)
        return task

    def _live_pod_address(self, task: TaskRecord) -> str | None:
        """The pod still assigned to this task (a resumed job keeps its pod), if any."""
        for pod in self._pod_items().values():
            if pod.task_id == task.task_id and pod.address:
                return pod.address
        return None

    async def _drop_task(self, task: TaskRecord) -> None:
        found = await self._tasks.get(task.job_id, task.task_id)
        if found is not None:
            with contextlib.suppress(DeepServeError):
                await self._tasks.delete(found)

    async def _release_task(self, job_id: str, slot: str) -> None:
        for found in await self._tasks.list(job_id):
            if slot and found.record.slot != slot:
                continue
            for pod in self._pod_items().values():
                if pod.task_id == found.record.task_id:
                    await self._pods.release(pod.pod_id)
            with contextlib.suppress(DeepServeError):
                await self._tasks.delete(found)

    async def _clean_up(self, job_id: str) -> None:
        await self._release_task(job_id, "")
        await self._job_event(job_id, "PodReleased", "the job's tasks are gone")

    # --- writes ----------------------------------------------------------------------------

    async def _update(
        self, job_id: str, change: Callable[[JobRecord, FineTuningJob], None]
    ) -> None:
        def apply(job: JobRecord) -> JobRecord | None:
            if job.fine_tuning is None or job.status.phase.terminal:
                return None
            change(job, job.fine_tuning)
            return job

        await self._jobs.update(job_id, apply)

    async def _job_event(self, job_id: str, reason: str, message: str) -> None:
        await self._jobs.add_event(job_id, reason, message)

    async def _fail(self, job_id: str, exc: DeepServeError) -> None:
        stage = "?"

        def failed(job: JobRecord) -> JobRecord | None:
            nonlocal stage
            if job.status.phase.terminal or job.fine_tuning is None:
                return None
            stage = job.fine_tuning.progress.stage.value
            job.status.phase = JobPhase.FAILED
            job.status.message = f"{stage} failed: {exc.message}"
            job.fine_tuning.progress.error_code = (
                "invalid_training_file" if exc.field == "training_file" else type(exc).__name__
            )
            job.fine_tuning.progress.error_message = exc.message
            job.fine_tuning.progress.error_param = exc.field or ""
            job.fine_tuning.progress.finished_at = time.time()
            job.record_event("Failed", job.status.message)
            return job

        await self._jobs.update(job_id, failed)
        log.info("fine-tuning job failed", extra={"fields": {"job_id": job_id, "stage": stage}})


def _apply(job: JobRecord, ft: FineTuningJob, reply: flowserve_pb2.RunTrainingResponse) -> None:
    """Folds one training event into the job's progress and events."""
    progress = ft.progress
    kind = reply.WhichOneof("event")
    if kind == "step":
        s = reply.step
        progress.step, progress.total_steps = s.step, s.total_steps
        progress.trained_tokens = s.trained_tokens
        progress.first_step_at = progress.first_step_at or time.time()
        progress.add_metric(StepMetric(step=s.step, train_loss=s.train_loss, seconds=s.seconds))
        job.record_event(
            "TrainingStep", f"Step {s.step}/{s.total_steps}: training loss={s.train_loss:.4f}"
        )
    elif kind == "checkpoint":
        c = reply.checkpoint
        progress.checkpoints.append(
            Checkpoint(step=c.step, artifact=c.artifact, train_loss=c.train_loss)
        )
        job.record_event("Checkpoint", f"checkpoint at step {c.step}: {c.artifact}")
    elif kind == "evaluation":
        e = reply.evaluation
        if e.when == "before":
            progress.valid_loss_before = e.valid_loss
        else:
            progress.valid_loss_after = e.valid_loss
        job.record_event("Validation", f"validation loss {e.when} training: {e.valid_loss:.4f}")
    elif kind == "done":
        progress.merged_model_dir = reply.done.model_dir
        progress.adapter_dir = reply.done.adapter_dir
        progress.trained_tokens = reply.done.trained_tokens
        progress.stage = Stage.EVALUATE
        written = [f"adapter {reply.done.adapter_dir}"] if reply.done.adapter_dir else []
        if reply.done.model_dir:
            written.append(f"merged model {reply.done.model_dir}")
        job.record_event("Trained", "written: " + ", ".join(written))
