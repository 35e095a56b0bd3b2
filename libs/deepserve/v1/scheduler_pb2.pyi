from deepserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RouteBranch(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUTE_BRANCH_UNSPECIFIED: _ClassVar[RouteBranch]
    ROUTE_BRANCH_LOCALITY: _ClassVar[RouteBranch]
    ROUTE_BRANCH_LOAD: _ClassVar[RouteBranch]
    ROUTE_BRANCH_ROUND_ROBIN: _ClassVar[RouteBranch]
    ROUTE_BRANCH_RANDOM: _ClassVar[RouteBranch]
    ROUTE_BRANCH_ANY: _ClassVar[RouteBranch]
    ROUTE_BRANCH_ADAPTER: _ClassVar[RouteBranch]
ROUTE_BRANCH_UNSPECIFIED: RouteBranch
ROUTE_BRANCH_LOCALITY: RouteBranch
ROUTE_BRANCH_LOAD: RouteBranch
ROUTE_BRANCH_ROUND_ROBIN: RouteBranch
ROUTE_BRANCH_RANDOM: RouteBranch
ROUTE_BRANCH_ANY: RouteBranch
ROUTE_BRANCH_ADAPTER: RouteBranch

class RouteRequest(_message.Message):
    __slots__ = ("request_id", "model", "tenant", "prompt_tokens", "max_tokens", "prefix_block_hashes", "exclude_instance_ids", "block_size", "cached_context_id", "adapter")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_INSTANCE_IDS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    CACHED_CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    tenant: str
    prompt_tokens: int
    max_tokens: int
    prefix_block_hashes: _containers.RepeatedScalarFieldContainer[str]
    exclude_instance_ids: _containers.RepeatedScalarFieldContainer[str]
    block_size: int
    cached_context_id: str
    adapter: str
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., tenant: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., prefix_block_hashes: _Optional[_Iterable[str]] = ..., exclude_instance_ids: _Optional[_Iterable[str]] = ..., block_size: _Optional[int] = ..., cached_context_id: _Optional[str] = ..., adapter: _Optional[str] = ...) -> None: ...

class RouteResponse(_message.Message):
    __slots__ = ("instances", "disaggregated", "branch", "reason", "scores", "predicted_decode_tokens", "policy", "pd_reason")
    class ScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    DISAGGREGATED_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_DECODE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PD_REASON_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[_common_pb2.Instance]
    disaggregated: bool
    branch: RouteBranch
    reason: str
    scores: _containers.ScalarMap[str, float]
    predicted_decode_tokens: int
    policy: str
    pd_reason: str
    def __init__(self, instances: _Optional[_Iterable[_Union[_common_pb2.Instance, _Mapping]]] = ..., disaggregated: _Optional[bool] = ..., branch: _Optional[_Union[RouteBranch, str]] = ..., reason: _Optional[str] = ..., scores: _Optional[_Mapping[str, float]] = ..., predicted_decode_tokens: _Optional[int] = ..., policy: _Optional[str] = ..., pd_reason: _Optional[str] = ...) -> None: ...

class ListInstancesRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListInstancesResponse(_message.Message):
    __slots__ = ("instances", "instances_added", "instances_removed")
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_ADDED_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_REMOVED_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[_common_pb2.Instance]
    instances_added: int
    instances_removed: int
    def __init__(self, instances: _Optional[_Iterable[_Union[_common_pb2.Instance, _Mapping]]] = ..., instances_added: _Optional[int] = ..., instances_removed: _Optional[int] = ...) -> None: ...

class ReportCompletionRequest(_message.Message):
    __slots__ = ("request_id", "model", "tenant", "prompt_tokens", "completion_tokens", "max_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    tenant: str
    prompt_tokens: int
    completion_tokens: int
    max_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., tenant: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ...) -> None: ...

class ReportCompletionResponse(_message.Message):
    __slots__ = ("predicted_decode_tokens", "correct")
    PREDICTED_DECODE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    predicted_decode_tokens: int
    correct: bool
    def __init__(self, predicted_decode_tokens: _Optional[int] = ..., correct: _Optional[bool] = ...) -> None: ...

class GetSchedulerStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetSchedulerStatsResponse(_message.Message):
    __slots__ = ("decisions", "predictions", "predictions_correct", "predictor_accuracy", "prefix_index_blocks", "instances")
    class DecisionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_CORRECT_FIELD_NUMBER: _ClassVar[int]
    PREDICTOR_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    PREFIX_INDEX_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    decisions: _containers.ScalarMap[str, int]
    predictions: int
    predictions_correct: int
    predictor_accuracy: float
    prefix_index_blocks: int
    instances: int
    def __init__(self, decisions: _Optional[_Mapping[str, int]] = ..., predictions: _Optional[int] = ..., predictions_correct: _Optional[int] = ..., predictor_accuracy: _Optional[float] = ..., prefix_index_blocks: _Optional[int] = ..., instances: _Optional[int] = ...) -> None: ...

class ReportInstanceFailureRequest(_message.Message):
    __slots__ = ("instance_id", "reason", "request_id")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    reason: str
    request_id: str
    def __init__(self, instance_id: _Optional[str] = ..., reason: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ReportInstanceFailureResponse(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: _Optional[bool] = ...) -> None: ...
