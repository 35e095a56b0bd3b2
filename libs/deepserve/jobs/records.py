"""Jobs as stored in etcd: the spec the user asked for, the status, and the event history."""

from __future__ import annotations

import time
from enum import StrEnum

from pydantic import BaseModel, Field

from deepserve.errors import InvalidArgument
from deepserve.jobs.batch import BatchJob
from deepserve.jobs.fine_tuning import FineTuningJob

MAX_EVENTS = 200


class JobKind(StrEnum):
    SERVING = "serving"
    FINE_TUNING = "fine_tuning"
    BATCH = "batch"


class JobPhase(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # The deadline passed before the job finished (a batch's completion window).
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self in (JobPhase.SUCCEEDED, JobPhase.FAILED, JobPhase.CANCELLED, JobPhase.EXPIRED)


class ServingMode(StrEnum):
    COLOCATED = "colocated"
    DISAGGREGATED = "disaggregated"


class RoutingPolicy(StrEnum):
    DEEPSERVE = "deepserve"
    ROUND_ROBIN = "round_robin"
    RANDOM = "random"
    LEAST_LOADED = "least_loaded"


class AutoscalingPolicy(BaseModel):
    """How the autoscaler sizes a deployment within [min_replicas, max_replicas]."""

    enabled: bool = False
    # Queued plus running requests one instance should carry.
    target_requests_per_instance: float = 4.0
    # KV cache use (0..1) above which a group gets another instance.
    target_kv_usage: float = 0.8
    # Latency objectives (0: none); misses above the tolerated fraction add a replica.
    ttft_slo_ms: float = 0.0
    tpot_slo_ms: float = 0.0
    # Seconds without traffic before scaling to zero (0: never; needs min_replicas 0).
    scale_to_zero_after_s: float = 0.0
    # After a scale-up, no further scale-up for this long (new instances absorb load first);
    # after any change, no scale-down for the down cooldown (against flapping).
    scale_up_cooldown_s: float = 5.0
    scale_down_cooldown_s: float = 30.0

    def normalized(self) -> AutoscalingPolicy:
        for name in (
            "target_requests_per_instance",
            "target_kv_usage",
            "ttft_slo_ms",
            "tpot_slo_ms",
            "scale_to_zero_after_s",
            "scale_up_cooldown_s",
            "scale_down_cooldown_s",
        ):
            if getattr(self, name) < 0:
                raise InvalidArgument("must be >= 0", field=f"autoscaling.{name}")
        policy = self.model_copy()
        if policy.target_requests_per_instance == 0:
            policy.target_requests_per_instance = 4.0
        if policy.target_kv_usage == 0 or policy.target_kv_usage > 1:
            policy.target_kv_usage = min(policy.target_kv_usage or 0.8, 1.0)
        return policy


class ServingSpec(BaseModel):
    """A model deployment: desired replicas within [min, max]."""

    model: str
    replicas: int = 1
    min_replicas: int = 0
    max_replicas: int = 0
    mode: ServingMode = ServingMode.COLOCATED
    prefill_instances: int = 1
    decode_instances: int = 1
    policy: RoutingPolicy = RoutingPolicy.DEEPSERVE
    tensor_parallel_size: int = 1
    autoscaling: AutoscalingPolicy = Field(default_factory=AutoscalingPolicy)

    def normalized(self) -> ServingSpec:
        """Fills defaults (max from replicas) and checks every bound, naming the bad field."""
        spec = self.model_copy()
        if not spec.model.strip():
            raise InvalidArgument("a model is required", field="model")
        if spec.replicas < 0:
            raise InvalidArgument("must be >= 0", field="replicas")
        if spec.min_replicas < 0:
            raise InvalidArgument("must be >= 0", field="min_replicas")
        if spec.max_replicas == 0:
            spec.max_replicas = max(spec.replicas, spec.min_replicas, 1)
        if spec.min_replicas > spec.max_replicas:
            raise InvalidArgument(
                f"min_replicas {spec.min_replicas} exceeds max_replicas {spec.max_replicas}",
                field="min_replicas",
            )
        if not spec.min_replicas <= spec.replicas <= spec.max_replicas:
            raise InvalidArgument(
                f"replicas {spec.replicas} outside [{spec.min_replicas}, {spec.max_replicas}]",
                field="replicas",
            )
        if spec.mode == ServingMode.DISAGGREGATED:
            if spec.prefill_instances < 1:
                raise InvalidArgument("must be >= 1 when disaggregated", field="prefill_instances")
            if spec.decode_instances < 1:
                raise InvalidArgument("must be >= 1 when disaggregated", field="decode_instances")
        if spec.tensor_parallel_size < 1:
            raise InvalidArgument("must be >= 1", field="tensor_parallel_size")
        spec.autoscaling = spec.autoscaling.normalized()
        return spec


class JobEvent(BaseModel):
    """Something that happened to a job or task: what changed, when, why."""

    at: float = Field(default_factory=time.time)
    reason: str
    message: str = ""


class JobStatus(BaseModel):
    """Where the job stands (written by the reconciler)."""

    phase: JobPhase = JobPhase.PENDING
    ready_replicas: int = 0
    message: str = ""


class JobRecord(BaseModel):
    """A job's spec, status and event history, as stored under /deepserve/jobs/<job id>."""

    job_id: str
    kind: JobKind
    serving: ServingSpec | None = None
    fine_tuning: FineTuningJob | None = None
    batch: BatchJob | None = None
    status: JobStatus = Field(default_factory=JobStatus)
    events: list[JobEvent] = Field(default_factory=list)
    created_at: float = Field(default_factory=time.time)
    # Set by DeleteJob: the reconciler removes the tasks, then the job record itself.
    delete_requested: bool = False

    @property
    def tenant(self) -> str:
        """The tenant that owns the job (fine-tuning and batch); serving jobs have none."""
        if self.fine_tuning is not None:
            return self.fine_tuning.spec.tenant
        if self.batch is not None:
            return self.batch.spec.tenant
        return ""

    def record_event(self, reason: str, message: str = "") -> None:
        self.events.append(JobEvent(reason=reason, message=message))
        del self.events[:-MAX_EVENTS]
