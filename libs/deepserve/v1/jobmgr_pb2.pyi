from deepserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_KIND_UNSPECIFIED: _ClassVar[JobKind]
    JOB_KIND_SERVING: _ClassVar[JobKind]
    JOB_KIND_FINE_TUNING: _ClassVar[JobKind]
    JOB_KIND_BATCH: _ClassVar[JobKind]

class JobPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_PHASE_UNSPECIFIED: _ClassVar[JobPhase]
    JOB_PHASE_PENDING: _ClassVar[JobPhase]
    JOB_PHASE_RUNNING: _ClassVar[JobPhase]
    JOB_PHASE_SUCCEEDED: _ClassVar[JobPhase]
    JOB_PHASE_FAILED: _ClassVar[JobPhase]
    JOB_PHASE_CANCELLED: _ClassVar[JobPhase]
    JOB_PHASE_EXPIRED: _ClassVar[JobPhase]

class ServingMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERVING_MODE_UNSPECIFIED: _ClassVar[ServingMode]
    SERVING_MODE_COLOCATED: _ClassVar[ServingMode]
    SERVING_MODE_DISAGGREGATED: _ClassVar[ServingMode]

class RoutingPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUTING_POLICY_UNSPECIFIED: _ClassVar[RoutingPolicy]
    ROUTING_POLICY_DEEPSERVE: _ClassVar[RoutingPolicy]
    ROUTING_POLICY_ROUND_ROBIN: _ClassVar[RoutingPolicy]
    ROUTING_POLICY_RANDOM: _ClassVar[RoutingPolicy]
    ROUTING_POLICY_LEAST_LOADED: _ClassVar[RoutingPolicy]

class FineTuningStage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINE_TUNING_STAGE_UNSPECIFIED: _ClassVar[FineTuningStage]
    FINE_TUNING_STAGE_PREPROCESS: _ClassVar[FineTuningStage]
    FINE_TUNING_STAGE_TRAIN: _ClassVar[FineTuningStage]
    FINE_TUNING_STAGE_EVALUATE: _ClassVar[FineTuningStage]
    FINE_TUNING_STAGE_REGISTER: _ClassVar[FineTuningStage]
    FINE_TUNING_STAGE_DONE: _ClassVar[FineTuningStage]

class BatchStage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BATCH_STAGE_UNSPECIFIED: _ClassVar[BatchStage]
    BATCH_STAGE_VALIDATING: _ClassVar[BatchStage]
    BATCH_STAGE_IN_PROGRESS: _ClassVar[BatchStage]
    BATCH_STAGE_FINALIZING: _ClassVar[BatchStage]
    BATCH_STAGE_DONE: _ClassVar[BatchStage]

class JobChange(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_CHANGE_UNSPECIFIED: _ClassVar[JobChange]
    JOB_CHANGE_PUT: _ClassVar[JobChange]
    JOB_CHANGE_DELETE: _ClassVar[JobChange]

class TaskState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_STATE_UNSPECIFIED: _ClassVar[TaskState]
    TASK_STATE_PENDING: _ClassVar[TaskState]
    TASK_STATE_STARTING: _ClassVar[TaskState]
    TASK_STATE_RUNNING: _ClassVar[TaskState]
    TASK_STATE_FAILED: _ClassVar[TaskState]
    TASK_STATE_TERMINATING: _ClassVar[TaskState]
JOB_KIND_UNSPECIFIED: JobKind
JOB_KIND_SERVING: JobKind
JOB_KIND_FINE_TUNING: JobKind
JOB_KIND_BATCH: JobKind
JOB_PHASE_UNSPECIFIED: JobPhase
JOB_PHASE_PENDING: JobPhase
JOB_PHASE_RUNNING: JobPhase
JOB_PHASE_SUCCEEDED: JobPhase
JOB_PHASE_FAILED: JobPhase
JOB_PHASE_CANCELLED: JobPhase
JOB_PHASE_EXPIRED: JobPhase
SERVING_MODE_UNSPECIFIED: ServingMode
SERVING_MODE_COLOCATED: ServingMode
SERVING_MODE_DISAGGREGATED: ServingMode
ROUTING_POLICY_UNSPECIFIED: RoutingPolicy
ROUTING_POLICY_DEEPSERVE: RoutingPolicy
ROUTING_POLICY_ROUND_ROBIN: RoutingPolicy
ROUTING_POLICY_RANDOM: RoutingPolicy
ROUTING_POLICY_LEAST_LOADED: RoutingPolicy
FINE_TUNING_STAGE_UNSPECIFIED: FineTuningStage
FINE_TUNING_STAGE_PREPROCESS: FineTuningStage
FINE_TUNING_STAGE_TRAIN: FineTuningStage
FINE_TUNING_STAGE_EVALUATE: FineTuningStage
FINE_TUNING_STAGE_REGISTER: FineTuningStage
FINE_TUNING_STAGE_DONE: FineTuningStage
BATCH_STAGE_UNSPECIFIED: BatchStage
BATCH_STAGE_VALIDATING: BatchStage
BATCH_STAGE_IN_PROGRESS: BatchStage
BATCH_STAGE_FINALIZING: BatchStage
BATCH_STAGE_DONE: BatchStage
JOB_CHANGE_UNSPECIFIED: JobChange
JOB_CHANGE_PUT: JobChange
JOB_CHANGE_DELETE: JobChange
TASK_STATE_UNSPECIFIED: TaskState
TASK_STATE_PENDING: TaskState
TASK_STATE_STARTING: TaskState
TASK_STATE_RUNNING: TaskState
TASK_STATE_FAILED: TaskState
TASK_STATE_TERMINATING: TaskState

class Adapter(_message.Message):
    __slots__ = ("name", "tenant", "base_model", "path", "rank", "source", "job_id", "created_at_unix")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    name: str
    tenant: str
    base_model: str
    path: str
    rank: int
    source: str
    job_id: str
    created_at_unix: float
    def __init__(self, name: _Optional[str] = ..., tenant: _Optional[str] = ..., base_model: _Optional[str] = ..., path: _Optional[str] = ..., rank: _Optional[int] = ..., source: _Optional[str] = ..., job_id: _Optional[str] = ..., created_at_unix: _Optional[float] = ...) -> None: ...

class RegisterAdapterRequest(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: Adapter
    def __init__(self, adapter: _Optional[_Union[Adapter, _Mapping]] = ...) -> None: ...

class RegisterAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: Adapter
    def __init__(self, adapter: _Optional[_Union[Adapter, _Mapping]] = ...) -> None: ...

class DeleteAdapterRequest(_message.Message):
    __slots__ = ("tenant", "name")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class DeleteAdapterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[Adapter]
    def __init__(self, adapters: _Optional[_Iterable[_Union[Adapter, _Mapping]]] = ...) -> None: ...

class ServingSpec(_message.Message):
    __slots__ = ("model", "replicas", "min_replicas", "max_replicas", "mode", "prefill_instances", "decode_instances", "policy", "tensor_parallel_size", "autoscaling")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MIN_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    DECODE_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    AUTOSCALING_FIELD_NUMBER: _ClassVar[int]
    model: str
    replicas: int
    min_replicas: int
    max_replicas: int
    mode: ServingMode
    prefill_instances: int
    decode_instances: int
    policy: RoutingPolicy
    tensor_parallel_size: int
    autoscaling: AutoscalingPolicy
    def __init__(self, model: _Optional[str] = ..., replicas: _Optional[int] = ..., min_replicas: _Optional[int] = ..., max_replicas: _Optional[int] = ..., mode: _Optional[_Union[ServingMode, str]] = ..., prefill_instances: _Optional[int] = ..., decode_instances: _Optional[int] = ..., policy: _Optional[_Union[RoutingPolicy, str]] = ..., tensor_parallel_size: _Optional[int] = ..., autoscaling: _Optional[_Union[AutoscalingPolicy, _Mapping]] = ...) -> None: ...

class AutoscalingPolicy(_message.Message):
    __slots__ = ("enabled", "target_requests_per_instance", "target_kv_usage", "ttft_slo_ms", "tpot_slo_ms", "scale_to_zero_after_s", "scale_up_cooldown_s", "scale_down_cooldown_s")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    TARGET_REQUESTS_PER_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    TARGET_KV_USAGE_FIELD_NUMBER: _ClassVar[int]
    TTFT_SLO_MS_FIELD_NUMBER: _ClassVar[int]
    TPOT_SLO_MS_FIELD_NUMBER: _ClassVar[int]
    SCALE_TO_ZERO_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    SCALE_UP_COOLDOWN_S_FIELD_NUMBER: _ClassVar[int]
    SCALE_DOWN_COOLDOWN_S_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    target_requests_per_instance: float
    target_kv_usage: float
    ttft_slo_ms: float
    tpot_slo_ms: float
    scale_to_zero_after_s: float
    scale_up_cooldown_s: float
    scale_down_cooldown_s: float
    def __init__(self, enabled: _Optional[bool] = ..., target_requests_per_instance: _Optional[float] = ..., target_kv_usage: _Optional[float] = ..., ttft_slo_ms: _Optional[float] = ..., tpot_slo_ms: _Optional[float] = ..., scale_to_zero_after_s: _Optional[float] = ..., scale_up_cooldown_s: _Optional[float] = ..., scale_down_cooldown_s: _Optional[float] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("kind", "serving", "fine_tuning", "batch")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    FINE_TUNING_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    kind: JobKind
    serving: ServingSpec
    fine_tuning: FineTuningSpec
    batch: BatchSpec
    def __init__(self, kind: _Optional[_Union[JobKind, str]] = ..., serving: _Optional[_Union[ServingSpec, _Mapping]] = ..., fine_tuning: _Optional[_Union[FineTuningSpec, _Mapping]] = ..., batch: _Optional[_Union[BatchSpec, _Mapping]] = ...) -> None: ...

class FineTuningSpec(_message.Message):
    __slots__ = ("model", "training_file", "validation_file", "n_epochs", "batch_size", "learning_rate_multiplier", "suffix", "seed", "tenant", "lora_rank", "lora_alpha", "checkpoint_every_steps", "validation_split", "metadata", "export_merged_model")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FILE_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FILE_FIELD_NUMBER: _ClassVar[int]
    N_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    SUFFIX_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_STEPS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_SPLIT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    EXPORT_MERGED_MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    training_file: str
    validation_file: str
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    suffix: str
    seed: int
    tenant: str
    lora_rank: int
    lora_alpha: int
    checkpoint_every_steps: int
    validation_split: float
    metadata: _containers.ScalarMap[str, str]
    export_merged_model: bool
    def __init__(self, model: _Optional[str] = ..., training_file: _Optional[str] = ..., validation_file: _Optional[str] = ..., n_epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate_multiplier: _Optional[float] = ..., suffix: _Optional[str] = ..., seed: _Optional[int] = ..., tenant: _Optional[str] = ..., lora_rank: _Optional[int] = ..., lora_alpha: _Optional[int] = ..., checkpoint_every_steps: _Optional[int] = ..., validation_split: _Optional[float] = ..., metadata: _Optional[_Mapping[str, str]] = ..., export_merged_model: _Optional[bool] = ...) -> None: ...

class FineTuningStepMetric(_message.Message):
    __slots__ = ("step", "train_loss", "at_unix", "seconds")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    step: int
    train_loss: float
    at_unix: float
    seconds: float
    def __init__(self, step: _Optional[int] = ..., train_loss: _Optional[float] = ..., at_unix: _Optional[float] = ..., seconds: _Optional[float] = ...) -> None: ...

class FineTuningCheckpoint(_message.Message):
    __slots__ = ("step", "artifact", "train_loss", "at_unix")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    step: int
    artifact: str
    train_loss: float
    at_unix: float
    def __init__(self, step: _Optional[int] = ..., artifact: _Optional[str] = ..., train_loss: _Optional[float] = ..., at_unix: _Optional[float] = ...) -> None: ...

class FineTuningProgress(_message.Message):
    __slots__ = ("stage", "dataset_artifact", "train_examples", "valid_examples", "step", "total_steps", "trained_tokens", "valid_loss_before", "valid_loss_after", "metrics", "checkpoints", "merged_model_dir", "fine_tuned_model", "error_code", "error_message", "error_param", "started_at_unix", "first_step_at_unix", "finished_at_unix", "adapter_dir")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DATASET_ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    TRAIN_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    VALID_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    TRAINED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VALID_LOSS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    VALID_LOSS_AFTER_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    MERGED_MODEL_DIR_FIELD_NUMBER: _ClassVar[int]
    FINE_TUNED_MODEL_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_PARAM_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    FIRST_STEP_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_DIR_FIELD_NUMBER: _ClassVar[int]
    stage: FineTuningStage
    dataset_artifact: str
    train_examples: int
    valid_examples: int
    step: int
    total_steps: int
    trained_tokens: int
    valid_loss_before: float
    valid_loss_after: float
    metrics: _containers.RepeatedCompositeFieldContainer[FineTuningStepMetric]
    checkpoints: _containers.RepeatedCompositeFieldContainer[FineTuningCheckpoint]
    merged_model_dir: str
    fine_tuned_model: str
    error_code: str
    error_message: str
    error_param: str
    started_at_unix: float
    first_step_at_unix: float
    finished_at_unix: float
    adapter_dir: str
    def __init__(self, stage: _Optional[_Union[FineTuningStage, str]] = ..., dataset_artifact: _Optional[str] = ..., train_examples: _Optional[int] = ..., valid_examples: _Optional[int] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., trained_tokens: _Optional[int] = ..., valid_loss_before: _Optional[float] = ..., valid_loss_after: _Optional[float] = ..., metrics: _Optional[_Iterable[_Union[FineTuningStepMetric, _Mapping]]] = ..., checkpoints: _Optional[_Iterable[_Union[FineTuningCheckpoint, _Mapping]]] = ..., merged_model_dir: _Optional[str] = ..., fine_tuned_model: _Optional[str] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ..., error_param: _Optional[str] = ..., started_at_unix: _Optional[float] = ..., first_step_at_unix: _Optional[float] = ..., finished_at_unix: _Optional[float] = ..., adapter_dir: _Optional[str] = ...) -> None: ...

class BatchSpec(_message.Message):
    __slots__ = ("input_file_id", "endpoint", "completion_window", "metadata", "tenant", "expires_at_unix")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    INPUT_FILE_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_WINDOW_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: _containers.ScalarMap[str, str]
    tenant: str
    expires_at_unix: float
    def __init__(self, input_file_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., completion_window: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., tenant: _Optional[str] = ..., expires_at_unix: _Optional[float] = ...) -> None: ...

class BatchError(_message.Message):
    __slots__ = ("code", "message", "param", "line")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PARAM_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    param: str
    line: int
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., param: _Optional[str] = ..., line: _Optional[int] = ...) -> None: ...

class BatchProgress(_message.Message):
    __slots__ = ("stage", "total", "completed", "failed", "segments", "cancel_requested", "output_file_id", "error_file_id", "errors", "in_progress_at_unix", "finalizing_at_unix", "completed_at_unix", "failed_at_unix", "cancelling_at_unix", "cancelled_at_unix", "expired_at_unix")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FILE_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FILE_ID_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    IN_PROGRESS_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    FINALIZING_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    FAILED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    CANCELLING_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    stage: BatchStage
    total: int
    completed: int
    failed: int
    segments: int
    cancel_requested: bool
    output_file_id: str
    error_file_id: str
    errors: _containers.RepeatedCompositeFieldContainer[BatchError]
    in_progress_at_unix: float
    finalizing_at_unix: float
    completed_at_unix: float
    failed_at_unix: float
    cancelling_at_unix: float
    cancelled_at_unix: float
    expired_at_unix: float
    def __init__(self, stage: _Optional[_Union[BatchStage, str]] = ..., total: _Optional[int] = ..., completed: _Optional[int] = ..., failed: _Optional[int] = ..., segments: _Optional[int] = ..., cancel_requested: _Optional[bool] = ..., output_file_id: _Optional[str] = ..., error_file_id: _Optional[str] = ..., errors: _Optional[_Iterable[_Union[BatchError, _Mapping]]] = ..., in_progress_at_unix: _Optional[float] = ..., finalizing_at_unix: _Optional[float] = ..., completed_at_unix: _Optional[float] = ..., failed_at_unix: _Optional[float] = ..., cancelling_at_unix: _Optional[float] = ..., cancelled_at_unix: _Optional[float] = ..., expired_at_unix: _Optional[float] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("at_unix", "reason", "message")
    AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    at_unix: float
    reason: str
    message: str
    def __init__(self, at_unix: _Optional[float] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class JobStatus(_message.Message):
    __slots__ = ("phase", "ready_replicas", "message", "fine_tuning", "batch")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    READY_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FINE_TUNING_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    phase: JobPhase
    ready_replicas: int
    message: str
    fine_tuning: FineTuningProgress
    batch: BatchProgress
    def __init__(self, phase: _Optional[_Union[JobPhase, str]] = ..., ready_replicas: _Optional[int] = ..., message: _Optional[str] = ..., fine_tuning: _Optional[_Union[FineTuningProgress, _Mapping]] = ..., batch: _Optional[_Union[BatchProgress, _Mapping]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "spec", "status", "events", "created_at_unix", "revision", "delete_requested")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DELETE_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    spec: JobSpec
    status: JobStatus
    events: _containers.RepeatedCompositeFieldContainer[JobEvent]
    created_at_unix: float
    revision: int
    delete_requested: bool
    def __init__(self, job_id: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., status: _Optional[_Union[JobStatus, _Mapping]] = ..., events: _Optional[_Iterable[_Union[JobEvent, _Mapping]]] = ..., created_at_unix: _Optional[float] = ..., revision: _Optional[int] = ..., delete_requested: _Optional[bool] = ...) -> None: ...

class CreateJobRequest(_message.Message):
    __slots__ = ("spec", "job_id")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    job_id: str
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ..., job_id: _Optional[str] = ...) -> None: ...

class CreateJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id", "tenant", "kind")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    tenant: str
    kind: JobKind
    def __init__(self, job_id: _Optional[str] = ..., tenant: _Optional[str] = ..., kind: _Optional[_Union[JobKind, str]] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job", "tasks")
    JOB_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    job: Job
    tasks: _containers.RepeatedCompositeFieldContainer[Task]
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ..., tasks: _Optional[_Iterable[_Union[Task, _Mapping]]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("kind", "tenant")
    KIND_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    kind: JobKind
    tenant: str
    def __init__(self, kind: _Optional[_Union[JobKind, str]] = ..., tenant: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class WatchJobsRequest(_message.Message):
    __slots__ = ("kind",)
    KIND_FIELD_NUMBER: _ClassVar[int]
    kind: JobKind
    def __init__(self, kind: _Optional[_Union[JobKind, str]] = ...) -> None: ...

class WatchJobsResponse(_message.Message):
    __slots__ = ("change", "job")
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    change: JobChange
    job: Job
    def __init__(self, change: _Optional[_Union[JobChange, str]] = ..., job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id", "tenant", "kind")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    tenant: str
    kind: JobKind
    def __init__(self, job_id: _Optional[str] = ..., tenant: _Optional[str] = ..., kind: _Optional[_Union[JobKind, str]] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class ScaleJobRequest(_message.Message):
    __slots__ = ("job_id", "replicas")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    replicas: int
    def __init__(self, job_id: _Optional[str] = ..., replicas: _Optional[int] = ...) -> None: ...

class ScaleJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class DeleteJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class DeleteJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "job_id", "slot", "role", "model", "state", "pod_id", "instance_id", "address", "cold_start", "events", "created_at_unix", "message", "revision", "scale_steps", "weights_source")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    POD_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    COLD_START_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    SCALE_STEPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SOURCE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    job_id: str
    slot: str
    role: _common_pb2.InstanceRole
    model: str
    state: TaskState
    pod_id: str
    instance_id: str
    address: str
    cold_start: bool
    events: _containers.RepeatedCompositeFieldContainer[JobEvent]
    created_at_unix: float
    message: str
    revision: int
    scale_steps: _containers.RepeatedCompositeFieldContainer[_common_pb2.ScaleStepTiming]
    weights_source: _common_pb2.WeightsSource
    def __init__(self, task_id: _Optional[str] = ..., job_id: _Optional[str] = ..., slot: _Optional[str] = ..., role: _Optional[_Union[_common_pb2.InstanceRole, str]] = ..., model: _Optional[str] = ..., state: _Optional[_Union[TaskState, str]] = ..., pod_id: _Optional[str] = ..., instance_id: _Optional[str] = ..., address: _Optional[str] = ..., cold_start: _Optional[bool] = ..., events: _Optional[_Iterable[_Union[JobEvent, _Mapping]]] = ..., created_at_unix: _Optional[float] = ..., message: _Optional[str] = ..., revision: _Optional[int] = ..., scale_steps: _Optional[_Iterable[_Union[_common_pb2.ScaleStepTiming, _Mapping]]] = ..., weights_source: _Optional[_Union[_common_pb2.WeightsSource, str]] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[Task]
    def __init__(self, tasks: _Optional[_Iterable[_Union[Task, _Mapping]]] = ...) -> None: ...
