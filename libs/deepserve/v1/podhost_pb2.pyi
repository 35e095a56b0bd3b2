from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class CreatePodRequest(_message.Message):
    __slots__ = ("pod_id",)
    POD_ID_FIELD_NUMBER: _ClassVar[int]
    pod_id: str
    def __init__(self, pod_id: _Optional[str] = ...) -> None: ...

class CreatePodResponse(_message.Message):
    __slots__ = ("host",)
    HOST_FIELD_NUMBER: _ClassVar[int]
    host: str
    def __init__(self, host: _Optional[str] = ...) -> None: ...

class DeletePodRequest(_message.Message):
    __slots__ = ("pod_id", "pid")
    POD_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    pod_id: str
    pid: int
    def __init__(self, pod_id: _Optional[str] = ..., pid: _Optional[int] = ...) -> None: ...

class DeletePodResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListHostPodsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListHostPodsResponse(_message.Message):
    __slots__ = ("host", "alive_pod_ids")
    HOST_FIELD_NUMBER: _ClassVar[int]
    ALIVE_POD_IDS_FIELD_NUMBER: _ClassVar[int]
    host: str
    alive_pod_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, host: _Optional[str] = ..., alive_pod_ids: _Optional[_Iterable[str]] = ...) -> None: ...
