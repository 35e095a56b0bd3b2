"""A batch job as stored in its JobRecord: what was asked, and how far it got."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field

from deepserve.errors import InvalidArgument

# OpenAI's completion windows, in seconds.
COMPLETION_WINDOWS = {"24h": 24 * 3600.0}
BATCH_ENDPOINTS = frozenset({"/v1/chat/completions"})


class BatchSpec(BaseModel):
    """What the user asked for (POST /v1/batches)."""

    input_file_id: str
    endpoint: str = "/v1/chat/completions"
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None
    tenant: str = ""
    # When the completion window closes (unix seconds); 0: never. Lines not answered by then
    # are not sent: they go to the error file as `batch_expired` and the batch ends expired.
    expires_at: float = 0.0

    def normalized(self) -> BatchSpec:
        if not self.input_file_id:
            raise InvalidArgument("an input_file_id is required", field="input_file_id")
        if self.endpoint not in BATCH_ENDPOINTS:
            raise InvalidArgument(
                f"endpoint {self.endpoint!r} is not supported (use /v1/chat/completions)",
                field="endpoint",
            )
        if self.completion_window not in COMPLETION_WINDOWS:
            raise InvalidArgument(
                f"completion_window {self.completion_window!r} is not supported (use '24h')",
                field="completion_window",
            )
        if self.metadata is not None and len(self.metadata) > 16:
            raise InvalidArgument("at most 16 metadata pairs", field="metadata")
        return self.model_copy(deep=True)

    def with_deadline(self, created_at: float) -> BatchSpec:
        """The spec with its window's end fixed, counted from `created_at`."""
        return self.model_copy(
            update={"expires_at": created_at + COMPLETION_WINDOWS[self.completion_window]}
        )


class BatchStage(StrEnum):
    """The batch's stages, in order (OpenAI's statuses while the job is not terminal)."""

    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    DONE = "done"


class BatchError(BaseModel):
    """Why a batch failed validation: one of OpenAI's `errors.data` entries."""

    code: str
    message: str
    param: str | None = None
    # The input line at fault (1-based), when one is.
    line: int | None = None


class BatchProgress(BaseModel):
    """Where the batch stands, written by the batch controller."""

    stage: BatchStage = BatchStage.VALIDATING
    total: int = 0
    completed: int = 0
    failed: int = 0
    # Result segments written to the file store so far (a restart reads them back and
    # skips the lines they hold).
    segments: int = 0
    cancel_requested: bool = False
    output_file_id: str = ""
    error_file_id: str = ""
    # Why validation failed: OpenAI's `errors.data` entries.
    errors: list[BatchError] = Field(default_factory=list)
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    cancelling_at: float | None = None
    cancelled_at: float | None = None
    expired_at: float | None = None


class BatchJob(BaseModel):
    """Spec and progress of one batch (JobRecord.batch)."""

    spec: BatchSpec
    progress: BatchProgress = Field(default_factory=BatchProgress)


def segment_artifact(job_id: str, index: int) -> str:
    return f"batches/{job_id}/segments/{index:06d}.jsonl"


def batch_artifacts(job_id: str) -> str:
    return f"batches/{job_id}"
