"""RunTraining on a pod: one LoRA run per job at a time, events streamed as they happen.

The loop runs in a worker thread and hands events to the RPC through an asyncio queue. When
the caller goes away (cancel, or its jobmgr died) the RPC coroutine is cancelled: the stop flag
is set and the thread ends before its next optimizer step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from deepserve.errors import InvalidArgument
from deepserve.files import FileStore
from deepserve.flowserve.training.lora_trainer import (
    CheckpointSaved,
    Evaluated,
    StepDone,
    TrainingEvent,
    TrainingFinished,
    TrainingPlan,
    TrainingStopped,
    run_lora_training,
)
from deepserve.v1 import flowserve_pb2 as pb

log = logging.getLogger(__name__)


def event_to_proto(event: TrainingEvent) -> pb.RunTrainingResponse:
    if isinstance(event, StepDone):
        return pb.RunTrainingResponse(
            step=pb.TrainingStep(
                step=event.step,
                total_steps=event.total_steps,
                train_loss=event.train_loss,
                tokens=event.tokens,
                trained_tokens=event.trained_tokens,
                seconds=event.seconds,
                learning_rate=event.learning_rate,
            )
        )
    if isinstance(event, CheckpointSaved):
        return pb.RunTrainingResponse(
            checkpoint=pb.TrainingCheckpoint(
                step=event.step, artifact=event.artifact, train_loss=event.train_loss
            )
        )
    if isinstance(event, Evaluated):
        return pb.RunTrainingResponse(
            evaluation=pb.TrainingEvaluation(
                when=event.when, valid_loss=event.valid_loss, examples=event.examples
            )
        )
    return pb.RunTrainingResponse(
        done=pb.TrainingDone(
            model_dir=str(event.model_dir) if event.model_dir else "",
            model=event.model_dir.name if event.model_dir else "",
            trained_tokens=event.trained_tokens,
            steps=event.steps,
            adapter_dir=str(event.adapter_dir) if event.adapter_dir else "",
        )
    )


class TrainingService:
    """Runs LoRA trainings on this pod; a new run of a job supersedes its previous one."""

    def __init__(
        self, files: FileStore, resolve_model: Callable[[str], Path], model_cache_dir: Path
    ) -> None:
        self._files = files
        self._resolve = resolve_model
        self._model_cache_dir = model_cache_dir
        self._runs: dict[str, tuple[threading.Event, asyncio.Future[TrainingFinished]]] = {}

    def _plan(self, request: pb.RunTrainingRequest) -> TrainingPlan:
        if not request.output_model or "/" in request.output_model:
            raise InvalidArgument("a plain output model name is required", field="output_model")
        base_dir = self._resolve(request.base_model)
        dataset = json.loads(self._files.get_artifact(request.dataset_artifact))
        resume = (
            self._files.get_artifact(request.resume_checkpoint)
            if request.resume_checkpoint
            else None
        )
        return TrainingPlan(
            base_dir=Path(base_dir),
            train=dataset["train"],
            valid=dataset["valid"],
            output_dir=self._model_cache_dir / request.output_model,
            n_epochs=request.n_epochs or 1,
            batch_size=request.batch_size or 1,
            learning_rate=request.learning_rate,
            lora_rank=request.lora_rank or 8,
            lora_alpha=request.lora_alpha or 16,
            seed=request.seed,
            checkpoint_every_steps=request.checkpoint_every_steps,
            resume=resume,
            adapter_only=request.adapter_only,
        )

    async def run(self, request: pb.RunTrainingRequest) -> AsyncIterator[pb.RunTrainingResponse]:
        previous = self._runs.get(request.job_id)
        if previous is not None:
            previous[0].set()
            with contextlib.suppress(BaseException):
                await asyncio.wait([previous[1]])
        plan = await asyncio.to_thread(self._plan, request)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TrainingEvent] = asyncio.Queue()
        stop = threading.Event()

        def emit(event: TrainingEvent) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        def save(step: int, data: bytes) -> str:
            name = f"{request.checkpoint_prefix or request.job_id}/step-{step:06d}.pt"
            self._files.put_artifact(name, data)
            return name

        pad_id = _pad_id(plan.base_dir)
        worker = asyncio.ensure_future(
            asyncio.to_thread(run_lora_training, plan, emit, stop, save, pad_id)
        )
        self._runs[request.job_id] = (stop, worker)
        log.info("training started", extra={"fields": {"job_id": request.job_id}})
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait([getter, worker], return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    while not queue.empty():
                        yield event_to_proto(queue.get_nowait())
                    worker.result()  # raises the loop's error, if any
                    return
                yield event_to_proto(getter.result())
        finally:
            stop.set()
            # Wait for the thread to leave its step, so the pod is free when this returns.
            with contextlib.suppress(BaseException):
                await asyncio.wait([worker])
            if self._runs.get(request.job_id, (None, None))[1] is worker:
                del self._runs[request.job_id]
            stopped = worker.done() and not worker.cancelled() and worker.exception() is not None
            if stopped and isinstance(worker.exception(), TrainingStopped):
                log.info("training stopped", extra={"fields": {"job_id": request.job_id}})


def _pad_id(base_dir: Path) -> int:
    try:
        config = json.loads((base_dir / "config.json").read_text())
    except (OSError, ValueError):
        return 0
    return int(config.get("pad_token_id") or config.get("eos_token_id") or 0)


_services: dict[int, TrainingService] = {}


def training_service_for(shell: object) -> TrainingService:
    """The pod's TrainingService (one per shell), built from the shell's settings."""
    found = _services.get(id(shell))
    if found is None:
        from deepserve.files import LocalFileStore
        from deepserve.models.catalog import default_cache_dir, resolve_model

        settings = shell.settings  # type: ignore[attr-defined]
        cache_dir = settings.model_cache_dir or default_cache_dir()
        found = TrainingService(
            LocalFileStore(settings.common.files_root),
            lambda name: resolve_model(name, cache_dir),
            cache_dir,
        )
        _services[id(shell)] = found
    return found
