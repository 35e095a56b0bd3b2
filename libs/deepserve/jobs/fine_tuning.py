"""A fine-tuning job as stored in its JobRecord: what was asked, and how far it got."""

from __future__ import annotations

import re
import time
from enum import StrEnum

from pydantic import BaseModel, Field

from deepserve.errors import InvalidArgument

# OpenAI's base learning rate times the job's learning_rate_multiplier.
BASE_LEARNING_RATE = 2e-4
MAX_METRICS = 500
_SUFFIX = re.compile(r"^[A-Za-z0-9_-]{0,40}$")


class Hyperparameters(BaseModel):
    """OpenAI's fine-tuning hyperparameters; zeros mean the defaults."""

    n_epochs: int = 3
    batch_size: int = 4
    learning_rate_multiplier: float = 1.0


class FineTuningSpec(BaseModel):
    """What the user asked for (POST /v1/fine_tuning/jobs) plus the platform's LoRA settings."""

    model: str
    training_file: str
    validation_file: str = ""
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    suffix: str = ""
    seed: int = 0
    tenant: str = ""
    lora_rank: int = 8
    lora_alpha: int = 16
    # A checkpoint every this many optimizer steps (0: at each epoch's end only).
    checkpoint_every_steps: int = 10
    # Held-out share of the training file when no validation file is given (>= 10 examples).
    validation_split: float = 0.1
    metadata: dict[str, str] | None = None
    # The job's product is a LoRA adapter served on the base model's running instances; this
    # also writes the base with the adapter merged in, as a model of its own.
    export_merged_model: bool = False

    def normalized(self) -> FineTuningSpec:
        spec = self.model_copy(deep=True)
        if not spec.model.strip():
            raise InvalidArgument("a model is required", field="model")
        if not spec.training_file:
            raise InvalidArgument("a training_file is required", field="training_file")
        if not _SUFFIX.match(spec.suffix):
            raise InvalidArgument("suffix: up to 40 letters, digits, '-' or '_'", field="suffix")
        if spec.metadata is not None and len(spec.metadata) > 16:
            raise InvalidArgument("at most 16 metadata pairs", field="metadata")
        hp = spec.hyperparameters
        hp.n_epochs = hp.n_epochs or 3
        hp.batch_size = hp.batch_size or 4
        hp.learning_rate_multiplier = hp.learning_rate_multiplier or 1.0
        if not 1 <= hp.n_epochs <= 50:
            raise InvalidArgument("must be in [1, 50]", field="hyperparameters.n_epochs")
        if not 1 <= hp.batch_size <= 256:
            raise InvalidArgument("must be in [1, 256]", field="hyperparameters.batch_size")
        if not 0 < hp.learning_rate_multiplier <= 100:
            raise InvalidArgument(
                "must be in (0, 100]", field="hyperparameters.learning_rate_multiplier"
            )
        if spec.lora_rank < 1:
            raise InvalidArgument("must be >= 1", field="lora_rank")
        if spec.lora_alpha < 1:
            raise InvalidArgument("must be >= 1", field="lora_alpha")
        if spec.checkpoint_every_steps < 0:
            raise InvalidArgument("must be >= 0", field="checkpoint_every_steps")
        if not 0 <= spec.validation_split < 1:
            raise InvalidArgument("must be in [0, 1)", field="validation_split")
        return spec

    @property
    def learning_rate(self) -> float:
        return BASE_LEARNING_RATE * self.hyperparameters.learning_rate_multiplier


class Stage(StrEnum):
    """The job's stages, in order; each runs as a task."""

    PREPROCESS = "preprocess"
    TRAIN = "train"
    EVALUATE = "evaluate"
    REGISTER = "register"
    DONE = "done"


class StepMetric(BaseModel):
    """One optimizer step's figures (OpenAI `metrics` events)."""

    step: int
    train_loss: float
    at: float = Field(default_factory=time.time)
    # The step's compute time as the pod measured it (batch to optimizer step, no reporting).
    seconds: float = 0.0


class Checkpoint(BaseModel):
    """A saved LoRA state a restarted job resumes from."""

    step: int
    artifact: str
    train_loss: float
    at: float = Field(default_factory=time.time)


class FineTuningProgress(BaseModel):
    """Where the job stands, written by the fine-tuning controller."""

    stage: Stage = Stage.PREPROCESS
    dataset_artifact: str = ""
    train_examples: int = 0
    valid_examples: int = 0
    step: int = 0
    total_steps: int = 0
    trained_tokens: int = 0
    valid_loss_before: float | None = None
    valid_loss_after: float | None = None
    metrics: list[StepMetric] = Field(default_factory=list)
    checkpoints: list[Checkpoint] = Field(default_factory=list)
    merged_model_dir: str = ""
    adapter_dir: str = ""
    fine_tuned_model: str = ""
    error_code: str = ""
    error_message: str = ""
    error_param: str = ""
    started_at: float | None = None
    first_step_at: float | None = None
    finished_at: float | None = None

    def add_metric(self, metric: StepMetric) -> None:
        self.metrics.append(metric)
        del self.metrics[:-MAX_METRICS]


class FineTuningJob(BaseModel):
    """Spec and progress of one fine-tuning job (JobRecord.fine_tuning)."""

    spec: FineTuningSpec
    progress: FineTuningProgress = Field(default_factory=FineTuningProgress)


def fine_tuned_model_name(base: str, suffix: str, job_id: str) -> str:
    """OpenAI's naming: ft:BASE:SUFFIX:ID (the base without any org/ path)."""
    short_base = base.rstrip("/").rsplit("/", 1)[-1]
    return f"ft:{short_base}:{suffix or 'deepserve'}:{job_id.removeprefix('ftjob-')}"
