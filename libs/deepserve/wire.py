"""Conversions between the shared records and their protobuf messages (the RPC edge)."""

from __future__ import annotations

from deepserve.errors import InvalidArgument
from deepserve.records import InstanceRecord, PodPurpose, PodRecord, PodState, Role
from deepserve.structured_output import StructuredOutput
from deepserve.v1 import common_pb2, podpool_pb2

_ROLE_TO_PROTO = {
    Role.COLOCATED: common_pb2.INSTANCE_ROLE_COLOCATED,
    Role.PREFILL: common_pb2.INSTANCE_ROLE_PREFILL,
    Role.DECODE: common_pb2.INSTANCE_ROLE_DECODE,
}
_ROLE_FROM_PROTO = {v: k for k, v in _ROLE_TO_PROTO.items()}
_POD_STATE_TO_PROTO = {
    PodState.STARTING: common_pb2.POD_STATE_STARTING,
    PodState.WARM: common_pb2.POD_STATE_WARM,
    PodState.ASSIGNED: common_pb2.POD_STATE_ASSIGNED,
    PodState.TERMINATING: common_pb2.POD_STATE_TERMINATING,
}
_POD_STATE_FROM_PROTO = {v: k for k, v in _POD_STATE_TO_PROTO.items()}
_PURPOSE_TO_PROTO = {
    PodPurpose.SERVING: podpool_pb2.POD_PURPOSE_SERVING,
    PodPurpose.TRAINING: podpool_pb2.POD_PURPOSE_TRAINING,
}
_PURPOSE_FROM_PROTO = {v: k for k, v in _PURPOSE_TO_PROTO.items()}


def role_to_proto(role: Role) -> int:
    return _ROLE_TO_PROTO[role]


def role_from_proto(value: int, *, default: Role = Role.COLOCATED, field: str = "role") -> Role:
    if value == common_pb2.INSTANCE_ROLE_UNSPECIFIED:
        return default
    try:
        return _ROLE_FROM_PROTO[value]
    except KeyError:
        raise InvalidArgument(f"unknown role {value}", field=field) from None


def purpose_to_proto(purpose: PodPurpose) -> int:
    return _PURPOSE_TO_PROTO[purpose]


def purpose_from_proto(value: int) -> PodPurpose:
    if value == podpool_pb2.POD_PURPOSE_UNSPECIFIED:
        return PodPurpose.SERVING
    try:
        return _PURPOSE_FROM_PROTO[value]
    except KeyError:
        raise InvalidArgument(f"unknown pod purpose {value}", field="purpose") from None


def pod_state_to_proto(state: PodState) -> int:
    return _POD_STATE_TO_PROTO[state]


def pod_state_from_proto(value: int) -> PodState | None:
    return _POD_STATE_FROM_PROTO.get(value)


def instance_to_proto(record: InstanceRecord) -> common_pb2.Instance:
    return common_pb2.Instance(
        instance_id=record.instance_id,
        model=record.model,
        role=role_to_proto(record.role),
        address=record.address,
        pod_id=record.pod_id,
        job_id=record.job_id,
        task_id=record.task_id,
        tensor_parallel_size=record.tensor_parallel_size,
        device=record.device,
        registered_at_unix=record.registered_at,
        block_size=record.block_size,
    )


def pod_to_proto(record: PodRecord) -> common_pb2.Pod:
    return common_pb2.Pod(
        pod_id=record.pod_id,
        state=pod_state_to_proto(record.state),
        address=record.address,
        host=record.host,
        pid=record.pid,
        model=record.model,
        role=role_to_proto(record.role),
        task_id=record.task_id,
        backend=record.backend,
        created_at_unix=record.created_at,
    )


_STRUCTURED_TO_PROTO: dict[str, int] = {
    "json_schema": common_pb2.STRUCTURED_OUTPUT_KIND_JSON_SCHEMA,
    "json_object": common_pb2.STRUCTURED_OUTPUT_KIND_JSON_OBJECT,
    "regex": common_pb2.STRUCTURED_OUTPUT_KIND_REGEX,
    "choice": common_pb2.STRUCTURED_OUTPUT_KIND_CHOICE,
    "grammar": common_pb2.STRUCTURED_OUTPUT_KIND_GRAMMAR,
    "lark": common_pb2.STRUCTURED_OUTPUT_KIND_LARK,
}
_STRUCTURED_FROM_PROTO = {v: k for k, v in _STRUCTURED_TO_PROTO.items()}


def structured_output_to_proto(value: StructuredOutput) -> common_pb2.StructuredOutput:
    return common_pb2.StructuredOutput(kind=_STRUCTURED_TO_PROTO[value.kind], spec=value.spec)  # type: ignore[arg-type]


def structured_output_from_proto(msg: common_pb2.StructuredOutput) -> StructuredOutput | None:
    """None for an unset constraint; InvalidArgument for a kind this build does not know."""
    if msg.kind == common_pb2.STRUCTURED_OUTPUT_KIND_UNSPECIFIED:
        return None
    kind = _STRUCTURED_FROM_PROTO.get(msg.kind)
    if kind is None:
        raise InvalidArgument(f"unknown kind {msg.kind}", field="sampling.structured_output")
    return StructuredOutput(kind, msg.spec, field="structured_output")  # type: ignore[arg-type]
