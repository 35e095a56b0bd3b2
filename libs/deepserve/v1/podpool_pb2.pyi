from deepserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AcquirePodRequest(_message.Message):
    __slots__ = ("task_id", "model", "role", "job_id", "tensor_parallel_size")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    model: str
    role: _common_pb2.InstanceRole
    job_id: str
    tensor_parallel_size: int
    def __init__(self, task_id: _Optional[str] = ..., model: _Optional[str] = ..., role: _Optional[_Union[_common_pb2.InstanceRole, str]] = ..., job_id: _Optional[str] = ..., tensor_parallel_size: _Optional[int] = ...) -> None: ...

class AcquirePodResponse(_message.Message):
    __slots__ = ("pod", "cold_start", "instance_id", "load_seconds", "claim_seconds")
    POD_FIELD_NUMBER: _ClassVar[int]
    COLD_START_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CLAIM_SECONDS_FIELD_NUMBER: _ClassVar[int]
    pod: _common_pb2.Pod
    cold_start: bool
    instance_id: str
    load_seconds: float
    claim_seconds: float
    def __init__(self, pod: _Optional[_Union[_common_pb2.Pod, _Mapping]] = ..., cold_start: _Optional[bool] = ..., instance_id: _Optional[str] = ..., load_seconds: _Optional[float] = ..., claim_seconds: _Optional[float] = ...) -> None: ...

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
    __slots__ = ("pods", "warm_target", "cold_starts", "warm_hits")
    PODS_FIELD_NUMBER: _ClassVar[int]
    WARM_TARGET_FIELD_NUMBER: _ClassVar[int]
    COLD_STARTS_FIELD_NUMBER: _ClassVar[int]
    WARM_HITS_FIELD_NUMBER: _ClassVar[int]
    pods: _containers.RepeatedCompositeFieldContainer[_common_pb2.Pod]
    warm_target: int
    cold_starts: int
    warm_hits: int
    def __init__(self, pods: _Optional[_Iterable[_Union[_common_pb2.Pod, _Mapping]]] = ..., warm_target: _Optional[int] = ..., cold_starts: _Optional[int] = ..., warm_hits: _Optional[int] = ...) -> None: ...
