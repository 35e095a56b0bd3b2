"""JobRecord <-> protobuf conversions for the JobManagerService edge."""

from __future__ import annotations

from deepserve.errors import InvalidArgument
from deepserve.jobs.records import (
    AutoscalingPolicy,
    JobEvent,
    JobKind,
    JobPhase,
    JobRecord,
    RoutingPolicy,
    ServingMode,
    ServingSpec,
)
from deepserve.store.etcd import Versioned
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


def kind_from_proto(value: int) -> JobKind | None:
    if value == pb.JOB_KIND_UNSPECIFIED:
        return None
    if value not in KIND_FROM_PROTO:
        raise InvalidArgument(f"unknown job kind {value}", field="kind")
    return KIND_FROM_PROTO[value]


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


def job_to_proto(job: Versioned[JobRecord]) -> pb.Job:
    record = job.record
    spec = pb.JobSpec(kind=KIND_TO_PROTO[record.kind])
    if record.serving is not None:
        spec.serving.CopyFrom(serving_spec_to_proto(record.serving))
    return pb.Job(
        job_id=record.job_id,
        spec=spec,
        status=pb.JobStatus(
            phase=PHASE_TO_PROTO[record.status.phase],
            ready_replicas=record.status.ready_replicas,
            message=record.status.message,
        ),
        events=[event_to_proto(e) for e in record.events],
        created_at_unix=record.created_at,
        revision=job.mod_revision,
    )


def event_to_proto(event: JobEvent) -> pb.JobEvent:
    return pb.JobEvent(at_unix=event.at, reason=event.reason, message=event.message)
