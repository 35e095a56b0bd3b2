from deepserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PodPurpose(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POD_PURPOSE_UNSPECIFIED: _ClassVar[PodPurpose]
    POD_PURPOSE_SERVING: _ClassVar[PodPurpose]
    POD_PURPOSE_TRAINING: _ClassVar[PodPurpose]
POD_PURPOSE_UNSPECIFIED: PodPurpose
POD_PURPOSE_SERVING: PodPurpose
POD_PURPOSE_TRAINING: PodPurpose

class AcquirePodRequest(_message.Message):
    __slots__ = ("task_id", "model", "role", "job_id", "tensor_parallel_size", "purpose")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    model: str
    role: _common_pb2.InstanceRole
    job_id: str
    tensor_parallel_size: int
    purpose: PodPurpose
    def __init__(self, task_id: _Optional[str] = ..., model: _Optional[str] = ..., role: _Optional[_Union[_common_pb2.InstanceRole, str]] = ..., job_id: _Optional[str] = ..., tensor_parallel_size: _Optional[int] = ..., purpose: _Optional[_Union[PodPurpose, str]] = ...) -> None: ...

class AcquirePodResponse(_message.Message):
    __slots__ = ("pod", "cold_start", "instance_id", "load_seconds", "claim_seconds", "steps", "weights_source")
    POD_FIELD_NUMBER: _ClassVar[int]
    COLD_START_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CLAIM_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SOURCE_FIELD_NUMBER: _ClassVar[int]
    pod: _common_pb2.Pod
    cold_start: bool
    instance_id: str
    load_seconds: float
    claim_seconds: float
    steps: _containers.RepeatedCompositeFieldContainer[_common_pb2.ScaleStepTiming]
    weights_source: _common_pb2.WeightsSource
    def __init__(self, pod: _Optional[_Union[_common_pb2.Pod, _Mapping]] = ..., cold_start: _Optional[bool] = ..., instance_id: _Optional[str] = ..., load_seconds: _Optional[float] = ..., claim_seconds: _Optional[float] = ..., steps: _Optional[_Iterable[_Union[_common_pb2.ScaleStepTiming, _Mapping]]] = ..., weights_source: _Optional[_Union[_common_pb2.WeightsSource, str]] = ...) -> None: ...

class ReleasePodRequest(_message.Message):
    __slots__ = ("pod_id", "terminate")
    POD_ID_FIELD_NUMBER: _ClassVar[int]
    TERMINATE_FIELD_NUMBER: _ClassVar[int]
    pod_id: str
    terminate: bool
    def __init__(self, pod_id: _Optional[str] = ..., terminate: _Optional[bool] = ...) -> None: ...

class ReleasePodResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPodsRequest(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: _common_pb2.PodState
    def __init__(self, state: _Optional[_Union[_common_pb2.PodState, str]] = ...) -> None: ...

class ListPodsResponse(_message.Message):
    __slots__ = ("pods", "warm_target", "cold_starts", "warm_hits", "dram_copies")
    PODS_FIELD_NUMBER: _ClassVar[int]
    WARM_TARGET_FIELD_NUMBER: _ClassVar[int]
    COLD_STARTS_FIELD_NUMBER: _ClassVar[int]
    WARM_HITS_FIELD_NUMBER: _ClassVar[int]
    DRAM_COPIES_FIELD_NUMBER: _ClassVar[int]
    pods: _containers.RepeatedCompositeFieldContainer[_common_pb2.Pod]
    warm_target: int
    cold_starts: int
    warm_hits: int
    dram_copies: _containers.RepeatedCompositeFieldContainer[DramCopy]
    def __init__(self, pods: _Optional[_Iterable[_Union[_common_pb2.Pod, _Mapping]]] = ..., warm_target: _Optional[int] = ..., cold_starts: _Optional[int] = ..., warm_hits: _Optional[int] = ..., dram_copies: _Optional[_Iterable[_Union[DramCopy, _Mapping]]] = ...) -> None: ...

class DramCopy(_message.Message):
    __slots__ = ("model", "host", "path", "nbytes", "pinned", "ready")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    model: str
    host: str
    path: str
    nbytes: int
    pinned: bool
    ready: bool
    def __init__(self, model: _Optional[str] = ..., host: _Optional[str] = ..., path: _Optional[str] = ..., nbytes: _Optional[int] = ..., pinned: _Optional[bool] = ..., ready: _Optional[bool] = ...) -> None: ...
