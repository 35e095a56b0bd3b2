"""JobRecord <-> protobuf conversions for the JobManagerService edge, both ways, every kind.

jobmgr sends `job_to_proto`; a client (the gateway, the CLI) turns the reply back into the
same JobRecord with `job_from_proto`, so both sides render and reason over one model.
Optional proto fields carry the record's `None`s; proto3 zeros of required-ish numbers mean
the defaults, as the specs' `normalized()` fill them.
"""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf.message import Message

from deepserve.errors import InvalidArgument
from deepserve.jobs.batch import BatchError, BatchJob, BatchProgress, BatchSpec, BatchStage
from deepserve.jobs.fine_tuning import (
    Checkpoint,
    FineTuningJob,
    FineTuningProgress,
    FineTuningSpec,
    Hyperparameters,
    Stage,
    StepMetric,
)
from deepserve.jobs.records import (
    AutoscalingPolicy,
    JobEvent,
    JobKind,
    JobPhase,
    JobRecord,
    JobStatus,
    RoutingPolicy,
    ServingMode,
    ServingSpec,
)
from deepserve.store.etcd import Versioned
from deepserve.store.keys import Keys
from deepserve.v1 import jobmgr_pb2 as pb

KIND_TO_PROTO = {
    JobKind.SERVING: pb.JOB_KIND_SERVING,
    JobKind.FINE_TUNING: pb.JOB_KIND_FINE_TUNING,
    JobKind.BATCH: pb.JOB_KIND_BATCH,
}
KIND_FROM_PROTO = {v: k for k, v in KIND_TO_PROTO.items()}
PHASE_TO_PROTO = {
    JobPhase.PENDING: pb.JOB_PHASE_PENDING,
    JobPhase.RUNNING: pb.JOB_PHASE_RUNNING,
    JobPhase.SUCCEEDED: pb.JOB_PHASE_SUCCEEDED,
    JobPhase.FAILED: pb.JOB_PHASE_FAILED,
    JobPhase.CANCELLED: pb.JOB_PHASE_CANCELLED,
    JobPhase.EXPIRED: pb.JOB_PHASE_EXPIRED,
}
PHASE_FROM_PROTO = {v: k for k, v in PHASE_TO_PROTO.items()}
MODE_TO_PROTO = {
    ServingMode.COLOCATED: pb.SERVING_MODE_COLOCATED,
    ServingMode.DISAGGREGATED: pb.SERVING_MODE_DISAGGREGATED,
}
MODE_FROM_PROTO = {v: k for k, v in MODE_TO_PROTO.items()}
POLICY_TO_PROTO = {
    RoutingPolicy.DEEPSERVE: pb.ROUTING_POLICY_DEEPSERVE,
    RoutingPolicy.ROUND_ROBIN: pb.ROUTING_POLICY_ROUND_ROBIN,
    RoutingPolicy.RANDOM: pb.ROUTING_POLICY_RANDOM,
    RoutingPolicy.LEAST_LOADED: pb.ROUTING_POLICY_LEAST_LOADED,
}
POLICY_FROM_PROTO = {v: k for k, v in POLICY_TO_PROTO.items()}
FT_STAGE_TO_PROTO = {
    Stage.PREPROCESS: pb.FINE_TUNING_STAGE_PREPROCESS,
    Stage.TRAIN: pb.FINE_TUNING_STAGE_TRAIN,
    Stage.EVALUATE: pb.FINE_TUNING_STAGE_EVALUATE,
    Stage.REGISTER: pb.FINE_TUNING_STAGE_REGISTER,
    Stage.DONE: pb.FINE_TUNING_STAGE_DONE,
}
FT_STAGE_FROM_PROTO = {v: k for k, v in FT_STAGE_TO_PROTO.items()}
BATCH_STAGE_TO_PROTO = {
    BatchStage.VALIDATING: pb.BATCH_STAGE_VALIDATING,
    BatchStage.IN_PROGRESS: pb.BATCH_STAGE_IN_PROGRESS,
    BatchStage.FINALIZING: pb.BATCH_STAGE_FINALIZING,
    BatchStage.DONE: pb.BATCH_STAGE_DONE,
}
BATCH_STAGE_FROM_PROTO = {v: k for k, v in BATCH_STAGE_TO_PROTO.items()}


def kind_from_proto(value: int) -> JobKind | None:
    if value == pb.JOB_KIND_UNSPECIFIED:
        return None
    if value not in KIND_FROM_PROTO:
        raise InvalidArgument(f"unknown job kind {value}", field="kind")
    return KIND_FROM_PROTO[value]


def kind_to_proto(kind: JobKind | None) -> int:
    return pb.JOB_KIND_UNSPECIFIED if kind is None else KIND_TO_PROTO[kind]


def _optional(msg: Message, name: str) -> float | None:
    return getattr(msg, name) if msg.HasField(name) else None  # type: ignore[no-any-return]


def _metadata(pairs: Mapping[str, str]) -> dict[str, str] | None:
    """An empty proto map stands for no metadata (OpenAI's `null`)."""
    return dict(pairs) or None


# --- serving ---------------------------------------------------------------------------------


def serving_spec_from_proto(msg: pb.ServingSpec) -> ServingSpec:
    return ServingSpec(
        model=msg.model,
        replicas=msg.replicas,
        min_replicas=msg.min_replicas,
        max_replicas=msg.max_replicas,
        mode=MODE_FROM_PROTO.get(msg.mode, ServingMode.COLOCATED),
        prefill_instances=msg.prefill_instances or 1,
        decode_instances=msg.decode_instances or 1,
        policy=POLICY_FROM_PROTO.get(msg.policy, RoutingPolicy.DEEPSERVE),
        tensor_parallel_size=msg.tensor_parallel_size or 1,
        autoscaling=autoscaling_from_proto(msg.autoscaling),
    )


def autoscaling_from_proto(msg: pb.AutoscalingPolicy) -> AutoscalingPolicy:
    """Zeros mean the defaults (proto3 cannot tell unset from zero)."""
    defaults = AutoscalingPolicy()
    return AutoscalingPolicy(
        enabled=msg.enabled,
        target_requests_per_instance=msg.target_requests_per_instance
        or defaults.target_requests_per_instance,
        target_kv_usage=msg.target_kv_usage or defaults.target_kv_usage,
        ttft_slo_ms=msg.ttft_slo_ms,
        tpot_slo_ms=msg.tpot_slo_ms,
        scale_to_zero_after_s=msg.scale_to_zero_after_s,
        scale_up_cooldown_s=msg.scale_up_cooldown_s or defaults.scale_up_cooldown_s,
        scale_down_cooldown_s=msg.scale_down_cooldown_s or defaults.scale_down_cooldown_s,
    )


def autoscaling_to_proto(policy: AutoscalingPolicy) -> pb.AutoscalingPolicy:
    return pb.AutoscalingPolicy(**policy.model_dump())


def serving_spec_to_proto(spec: ServingSpec) -> pb.ServingSpec:
    return pb.ServingSpec(
        model=spec.model,
        replicas=spec.replicas,
        min_replicas=spec.min_replicas,
        max_replicas=spec.max_replicas,
        mode=MODE_TO_PROTO[spec.mode],
        prefill_instances=spec.prefill_instances,
        decode_instances=spec.decode_instances,
        policy=POLICY_TO_PROTO[spec.policy],
        tensor_parallel_size=spec.tensor_parallel_size,
        autoscaling=autoscaling_to_proto(spec.autoscaling),
    )


# --- fine-tuning -----------------------------------------------------------------------------


def fine_tuning_spec_from_proto(msg: pb.FineTuningSpec) -> FineTuningSpec:
    """Zero hyperparameters mean the defaults (`normalized()` fills them); unset LoRA fields too."""
    defaults = FineTuningSpec(model="", training_file="")
    return FineTuningSpec(
        model=msg.model,
        training_file=msg.training_file,
        validation_file=msg.validation_file,
        hyperparameters=Hyperparameters(
            n_epochs=msg.n_epochs,
            batch_size=msg.batch_size,
            learning_rate_multiplier=msg.learning_rate_multiplier,
        ),
        suffix=msg.suffix,
        seed=msg.seed,
        tenant=msg.tenant,
        lora_rank=msg.lora_rank if msg.HasField("lora_rank") else defaults.lora_rank,
        lora_alpha=msg.lora_alpha if msg.HasField("lora_alpha") else defaults.lora_alpha,
        checkpoint_every_steps=msg.checkpoint_every_steps
        if msg.HasField("checkpoint_every_steps")
        else defaults.checkpoint_every_steps,
        validation_split=msg.validation_split
        if msg.HasField("validation_split")
        else defaults.validation_split,
        metadata=_metadata(msg.metadata),
        export_merged_model=msg.export_merged_model,
    )


def fine_tuning_spec_to_proto(spec: FineTuningSpec) -> pb.FineTuningSpec:
    hp = spec.hyperparameters
    return pb.FineTuningSpec(
        model=spec.model,
        training_file=spec.training_file,
        validation_file=spec.validation_file,
        n_epochs=hp.n_epochs,
        batch_size=hp.batch_size,
        learning_rate_multiplier=hp.learning_rate_multiplier,
        suffix=spec.suffix,
        seed=spec.seed,
        tenant=spec.tenant,
        lora_rank=spec.lora_rank,
        lora_alpha=spec.lora_alpha,
        checkpoint_every_steps=spec.checkpoint_every_steps,
        validation_split=spec.validation_split,
        metadata=spec.metadata or {},
        export_merged_model=spec.export_merged_model,
    )


def fine_tuning_progress_to_proto(progress: FineTuningProgress) -> pb.FineTuningProgress:
    return pb.FineTuningProgress(
        stage=FT_STAGE_TO_PROTO[progress.stage],
        dataset_artifact=progress.dataset_artifact,
        train_examples=progress.train_examples,
        valid_examples=progress.valid_examples,
        step=progress.step,
        total_steps=progress.total_steps,
        trained_tokens=progress.trained_tokens,
        valid_loss_before=progress.valid_loss_before,
        valid_loss_after=progress.valid_loss_after,
        metrics=[
            pb.FineTuningStepMetric(
                step=m.step, train_loss=m.train_loss, at_unix=m.at, seconds=m.seconds
            )
            for m in progress.metrics
        ],
        checkpoints=[
            pb.FineTuningCheckpoint(
                step=c.step, artifact=c.artifact, train_loss=c.train_loss, at_unix=c.at
            )
            for c in progress.checkpoints
        ],
        merged_model_dir=progress.merged_model_dir,
        adapter_dir=progress.adapter_dir,
        fine_tuned_model=progress.fine_tuned_model,
        error_code=progress.error_code,
        error_message=progress.error_message,
        error_param=progress.error_param,
        started_at_unix=progress.started_at,
        first_step_at_unix=progress.first_step_at,
        finished_at_unix=progress.finished_at,
    )


def fine_tuning_progress_from_proto(msg: pb.FineTuningProgress) -> FineTuningProgress:
    return FineTuningProgress(
        stage=FT_STAGE_FROM_PROTO.get(msg.stage, Stage.PREPROCESS),
        dataset_artifact=msg.dataset_artifact,
        train_examples=msg.train_examples,
        valid_examples=msg.valid_examples,
        step=msg.step,
        total_steps=msg.total_steps,
        trained_tokens=msg.trained_tokens,
        valid_loss_before=_optional(msg, "valid_loss_before"),
        valid_loss_after=_optional(msg, "valid_loss_after"),
        metrics=[
            StepMetric(step=m.step, train_loss=m.train_loss, at=m.at_unix, seconds=m.seconds)
            for m in msg.metrics
        ],
        checkpoints=[
            Checkpoint(step=c.step, artifact=c.artifact, train_loss=c.train_loss, at=c.at_unix)
            for c in msg.checkpoints
        ],
        merged_model_dir=msg.merged_model_dir,
        adapter_dir=msg.adapter_dir,
        fine_tuned_model=msg.fine_tuned_model,
        error_code=msg.error_code,
        error_message=msg.error_message,
        error_param=msg.error_param,
        started_at=_optional(msg, "started_at_unix"),
        first_step_at=_optional(msg, "first_step_at_unix"),
        finished_at=_optional(msg, "finished_at_unix"),
    )


# --- batch -----------------------------------------------------------------------------------


def batch_spec_from_proto(msg: pb.BatchSpec) -> BatchSpec:
    """Empty endpoint and window mean the defaults (the only ones supported)."""
    defaults = BatchSpec(input_file_id="")
    return BatchSpec(
        input_file_id=msg.input_file_id,
        endpoint=msg.endpoint or defaults.endpoint,
        completion_window=msg.completion_window or defaults.completion_window,
        metadata=_metadata(msg.metadata),
        tenant=msg.tenant,
        expires_at=msg.expires_at_unix,
    )


def batch_spec_to_proto(spec: BatchSpec) -> pb.BatchSpec:
    return pb.BatchSpec(
        input_file_id=spec.input_file_id,
        endpoint=spec.endpoint,
        completion_window=spec.completion_window,
        metadata=spec.metadata or {},
        tenant=spec.tenant,
        expires_at_unix=spec.expires_at,
    )


def batch_progress_to_proto(progress: BatchProgress) -> pb.BatchProgress:
    return pb.BatchProgress(
        stage=BATCH_STAGE_TO_PROTO[progress.stage],
        total=progress.total,
        completed=progress.completed,
        failed=progress.failed,
        segments=progress.segments,
        cancel_requested=progress.cancel_requested,
        output_file_id=progress.output_file_id,
        error_file_id=progress.error_file_id,
        errors=[
            pb.BatchError(code=e.code, message=e.message, param=e.param or "", line=e.line)
            for e in progress.errors
        ],
        in_progress_at_unix=progress.in_progress_at,
        finalizing_at_unix=progress.finalizing_at,
        completed_at_unix=progress.completed_at,
        failed_at_unix=progress.failed_at,
        cancelling_at_unix=progress.cancelling_at,
        cancelled_at_unix=progress.cancelled_at,
        expired_at_unix=progress.expired_at,
    )


def batch_progress_from_proto(msg: pb.BatchProgress) -> BatchProgress:
    return BatchProgress(
        stage=BATCH_STAGE_FROM_PROTO.get(msg.stage, BatchStage.VALIDATING),
        total=msg.total,
        completed=msg.completed,
        failed=msg.failed,
        segments=msg.segments,
        cancel_requested=msg.cancel_requested,
        output_file_id=msg.output_file_id,
        error_file_id=msg.error_file_id,
        errors=[
            BatchError(
                code=e.code,
                message=e.message,
                param=e.param or None,
                line=e.line if e.HasField("line") else None,
            )
            for e in msg.errors
        ],
        in_progress_at=_optional(msg, "in_progress_at_unix"),
        finalizing_at=_optional(msg, "finalizing_at_unix"),
        completed_at=_optional(msg, "completed_at_unix"),
        failed_at=_optional(msg, "failed_at_unix"),
        cancelling_at=_optional(msg, "cancelling_at_unix"),
        cancelled_at=_optional(msg, "cancelled_at_unix"),
        expired_at=_optional(msg, "expired_at_unix"),
    )


# --- jobs ------------------------------------------------------------------------------------


def spec_to_proto(spec: ServingSpec | FineTuningSpec | BatchSpec) -> pb.JobSpec:
    """The JobSpec a client sends to CreateJob."""
    if isinstance(spec, ServingSpec):
        return pb.JobSpec(kind=pb.JOB_KIND_SERVING, serving=serving_spec_to_proto(spec))
    if isinstance(spec, FineTuningSpec):
        return pb.JobSpec(kind=pb.JOB_KIND_FINE_TUNING, fine_tuning=fine_tuning_spec_to_proto(spec))
    return pb.JobSpec(kind=pb.JOB_KIND_BATCH, batch=batch_spec_to_proto(spec))


def spec_from_proto(msg: pb.JobSpec) -> ServingSpec | FineTuningSpec | BatchSpec:
    """The spec CreateJob was sent; its oneof must match the kind."""
    kind = kind_from_proto(msg.kind)
    if kind is None:
        raise InvalidArgument("a job kind is required", field="spec.kind")
    which = msg.WhichOneof("spec")
    if which != kind.value:
        raise InvalidArgument(
            f"a {kind.value} job needs spec.{kind.value}, got {which or 'no spec'}",
            field=f"spec.{kind.value}",
        )
    if kind == JobKind.SERVING:
        return serving_spec_from_proto(msg.serving)
    if kind == JobKind.FINE_TUNING:
        return fine_tuning_spec_from_proto(msg.fine_tuning)
    return batch_spec_from_proto(msg.batch)


def job_to_proto(job: Versioned[JobRecord]) -> pb.Job:
    record = job.record
    spec = pb.JobSpec(kind=KIND_TO_PROTO[record.kind])
    status = pb.JobStatus(
        phase=PHASE_TO_PROTO[record.status.phase],
        ready_replicas=record.status.ready_replicas,
        message=record.status.message,
    )
    if record.serving is not None:
        spec.serving.CopyFrom(serving_spec_to_proto(record.serving))
    if record.fine_tuning is not None:
        spec.fine_tuning.CopyFrom(fine_tuning_spec_to_proto(record.fine_tuning.spec))
        status.fine_tuning.CopyFrom(fine_tuning_progress_to_proto(record.fine_tuning.progress))
    if record.batch is not None:
        spec.batch.CopyFrom(batch_spec_to_proto(record.batch.spec))
        status.batch.CopyFrom(batch_progress_to_proto(record.batch.progress))
    return pb.Job(
        job_id=record.job_id,
        spec=spec,
        status=status,
        events=[event_to_proto(e) for e in record.events],
        created_at_unix=record.created_at,
        revision=job.mod_revision,
        delete_requested=record.delete_requested,
    )


def job_from_proto(msg: pb.Job) -> Versioned[JobRecord]:
    """The JobRecord a Job message stands for, with the revision it was read at."""
    kind = kind_from_proto(msg.spec.kind)
    if kind is None:
        raise InvalidArgument(f"job {msg.job_id!r} has no kind", field="spec.kind")
    spec, status = msg.spec, msg.status
    record = JobRecord(
        job_id=msg.job_id,
        kind=kind,
        status=JobStatus(
            phase=PHASE_FROM_PROTO.get(status.phase, JobPhase.PENDING),
            ready_replicas=status.ready_replicas,
            message=status.message,
        ),
        events=[event_from_proto(e) for e in msg.events],
        created_at=msg.created_at_unix,
        delete_requested=msg.delete_requested,
    )
    which = spec.WhichOneof("spec")
    if which == "serving":
        record.serving = serving_spec_from_proto(spec.serving)
    elif which == "fine_tuning":
        record.fine_tuning = FineTuningJob(
            spec=fine_tuning_spec_from_proto(spec.fine_tuning),
            progress=fine_tuning_progress_from_proto(status.fine_tuning),
        )
    elif which == "batch":
        record.batch = BatchJob(
            spec=batch_spec_from_proto(spec.batch),
            progress=batch_progress_from_proto(status.batch),
        )
    return Versioned(Keys.job(msg.job_id), record, msg.revision)


def event_to_proto(event: JobEvent) -> pb.JobEvent:
    return pb.JobEvent(at_unix=event.at, reason=event.reason, message=event.message)


def event_from_proto(msg: pb.JobEvent) -> JobEvent:
    return JobEvent(at=msg.at_unix, reason=msg.reason, message=msg.message)
