from deepserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVTransferMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_TRANSFER_MODE_UNSPECIFIED: _ClassVar[KVTransferMode]
    KV_TRANSFER_MODE_WHOLE_REQUEST: _ClassVar[KVTransferMode]
    KV_TRANSFER_MODE_LAYERWISE: _ClassVar[KVTransferMode]

class KVTransport(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_TRANSPORT_UNSPECIFIED: _ClassVar[KVTransport]
    KV_TRANSPORT_GRPC: _ClassVar[KVTransport]
    KV_TRANSPORT_SHARED_MEMORY: _ClassVar[KVTransport]
    KV_TRANSPORT_TCP: _ClassVar[KVTransport]
KV_TRANSFER_MODE_UNSPECIFIED: KVTransferMode
KV_TRANSFER_MODE_WHOLE_REQUEST: KVTransferMode
KV_TRANSFER_MODE_LAYERWISE: KVTransferMode
KV_TRANSPORT_UNSPECIFIED: KVTransport
KV_TRANSPORT_GRPC: KVTransport
KV_TRANSPORT_SHARED_MEMORY: KVTransport
KV_TRANSPORT_TCP: KVTransport

class PinContextRequest(_message.Message):
    __slots__ = ("context_id", "model", "prompt_token_ids", "cache_salt", "expires_at_unix")
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    context_id: str
    model: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    cache_salt: str
    expires_at_unix: float
    def __init__(self, context_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., cache_salt: _Optional[str] = ..., expires_at_unix: _Optional[float] = ...) -> None: ...

class PinContextResponse(_message.Message):
    __slots__ = ("pinned_tokens", "cached_tokens")
    PINNED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    pinned_tokens: int
    cached_tokens: int
    def __init__(self, pinned_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class UnpinContextRequest(_message.Message):
    __slots__ = ("context_id",)
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    context_id: str
    def __init__(self, context_id: _Optional[str] = ...) -> None: ...

class UnpinContextResponse(_message.Message):
    __slots__ = ("unpinned",)
    UNPINNED_FIELD_NUMBER: _ClassVar[int]
    unpinned: bool
    def __init__(self, unpinned: _Optional[bool] = ...) -> None: ...

class ListPinnedContextsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PinnedContext(_message.Message):
    __slots__ = ("context_id", "pinned_tokens", "expires_at_unix")
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    PINNED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    context_id: str
    pinned_tokens: int
    expires_at_unix: float
    def __init__(self, context_id: _Optional[str] = ..., pinned_tokens: _Optional[int] = ..., expires_at_unix: _Optional[float] = ...) -> None: ...

class ListPinnedContextsResponse(_message.Message):
    __slots__ = ("contexts",)
    CONTEXTS_FIELD_NUMBER: _ClassVar[int]
    contexts: _containers.RepeatedCompositeFieldContainer[PinnedContext]
    def __init__(self, contexts: _Optional[_Iterable[_Union[PinnedContext, _Mapping]]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "model", "prompt_token_ids", "sampling", "detokenize", "tenant", "priority", "prefill_address", "kv_transfer_mode", "output_token_ids", "cache_salt", "cached_context_id", "cached_context_tokens", "cached_context_expires_at_unix", "adapter", "adapter_path")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    DETOKENIZE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    PREFILL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_MODE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    CACHED_CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    CACHED_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_CONTEXT_EXPIRES_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_PATH_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    detokenize: bool
    tenant: str
    priority: int
    prefill_address: str
    kv_transfer_mode: KVTransferMode
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    cache_salt: str
    cached_context_id: str
    cached_context_tokens: int
    cached_context_expires_at_unix: float
    adapter: str
    adapter_path: str
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., detokenize: _Optional[bool] = ..., tenant: _Optional[str] = ..., priority: _Optional[int] = ..., prefill_address: _Optional[str] = ..., kv_transfer_mode: _Optional[_Union[KVTransferMode, str]] = ..., output_token_ids: _Optional[_Iterable[int]] = ..., cache_salt: _Optional[str] = ..., cached_context_id: _Optional[str] = ..., cached_context_tokens: _Optional[int] = ..., cached_context_expires_at_unix: _Optional[float] = ..., adapter: _Optional[str] = ..., adapter_path: _Optional[str] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "model", "prompt_token_ids", "sampling", "skip_blocks", "block_size", "mode", "transports", "host_id", "cache_salt")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SKIP_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    skip_blocks: int
    block_size: int
    mode: KVTransferMode
    transports: _containers.RepeatedScalarFieldContainer[KVTransport]
    host_id: str
    cache_salt: str
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., skip_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., mode: _Optional[_Union[KVTransferMode, str]] = ..., transports: _Optional[_Iterable[_Union[KVTransport, str]]] = ..., host_id: _Optional[str] = ..., cache_salt: _Optional[str] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("kv", "done", "heartbeat", "kv_offer")
    KV_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    KV_OFFER_FIELD_NUMBER: _ClassVar[int]
    kv: KVChunk
    done: PrefillDone
    heartbeat: PrefillHeartbeat
    kv_offer: BulkOffer
    def __init__(self, kv: _Optional[_Union[KVChunk, _Mapping]] = ..., done: _Optional[_Union[PrefillDone, _Mapping]] = ..., heartbeat: _Optional[_Union[PrefillHeartbeat, _Mapping]] = ..., kv_offer: _Optional[_Union[BulkOffer, _Mapping]] = ...) -> None: ...

class PrefillHeartbeat(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("first_block", "num_blocks", "layer_start", "num_layers", "total_layers", "dtype", "shape", "data", "shared_memory", "tcp_nbytes")
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    TCP_NBYTES_FIELD_NUMBER: _ClassVar[int]
    first_block: int
    num_blocks: int
    layer_start: int
    num_layers: int
    total_layers: int
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    shared_memory: SharedMemorySegment
    tcp_nbytes: int
    def __init__(self, first_block: _Optional[int] = ..., num_blocks: _Optional[int] = ..., layer_start: _Optional[int] = ..., num_layers: _Optional[int] = ..., total_layers: _Optional[int] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., shared_memory: _Optional[_Union[SharedMemorySegment, _Mapping]] = ..., tcp_nbytes: _Optional[int] = ...) -> None: ...

class SharedMemorySegment(_message.Message):
    __slots__ = ("path", "nbytes")
    PATH_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    path: str
    nbytes: int
    def __init__(self, path: _Optional[str] = ..., nbytes: _Optional[int] = ...) -> None: ...

class PrefillDone(_message.Message):
    __slots__ = ("first_token_id", "cached_tokens", "blocks_sent", "bytes_sent", "transport", "layerwise")
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    LAYERWISE_FIELD_NUMBER: _ClassVar[int]
    first_token_id: int
    cached_tokens: int
    blocks_sent: int
    bytes_sent: int
    transport: KVTransport
    layerwise: bool
    def __init__(self, first_token_id: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., blocks_sent: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., transport: _Optional[_Union[KVTransport, str]] = ..., layerwise: _Optional[bool] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "token_ids", "text", "logprobs", "finish_reason", "usage", "stop_reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprobs]
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    stop_reason: str
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprobs, _Mapping]]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., stop_reason: _Optional[str] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("aborted",)
    ABORTED_FIELD_NUMBER: _ClassVar[int]
    aborted: bool
    def __init__(self, aborted: _Optional[bool] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("instance_id", "model", "role", "running_requests", "waiting_requests", "kv_blocks_used", "kv_blocks_free", "kv_blocks_total", "prefix_cache_hit_rate", "generation_tokens_per_s", "ready", "kv_received")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    KV_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    model: str
    role: _common_pb2.InstanceRole
    running_requests: int
    waiting_requests: int
    kv_blocks_used: int
    kv_blocks_free: int
    kv_blocks_total: int
    prefix_cache_hit_rate: float
    generation_tokens_per_s: float
    ready: bool
    kv_received: KVTransferStats
    def __init__(self, instance_id: _Optional[str] = ..., model: _Optional[str] = ..., role: _Optional[_Union[_common_pb2.InstanceRole, str]] = ..., running_requests: _Optional[int] = ..., waiting_requests: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., prefix_cache_hit_rate: _Optional[float] = ..., generation_tokens_per_s: _Optional[float] = ..., ready: _Optional[bool] = ..., kv_received: _Optional[_Union[KVTransferStats, _Mapping]] = ...) -> None: ...

class KVTransferStats(_message.Message):
    __slots__ = ("transfers", "failures", "blocks", "skipped_blocks", "bytes", "transfer_seconds", "prefill_seconds", "layerwise", "shared_memory")
    TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAYERWISE_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    transfers: int
    failures: int
    blocks: int
    skipped_blocks: int
    bytes: int
    transfer_seconds: float
    prefill_seconds: float
    layerwise: int
    shared_memory: int
    def __init__(self, transfers: _Optional[int] = ..., failures: _Optional[int] = ..., blocks: _Optional[int] = ..., skipped_blocks: _Optional[int] = ..., bytes: _Optional[int] = ..., transfer_seconds: _Optional[float] = ..., prefill_seconds: _Optional[float] = ..., layerwise: _Optional[int] = ..., shared_memory: _Optional[int] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("model", "role", "job_id", "task_id", "tensor_parallel_size", "weights_source", "weights_path", "fork_from")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SOURCE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_PATH_FIELD_NUMBER: _ClassVar[int]
    FORK_FROM_FIELD_NUMBER: _ClassVar[int]
    model: str
    role: _common_pb2.InstanceRole
    job_id: str
    task_id: str
    tensor_parallel_size: int
    weights_source: _common_pb2.WeightsSource
    weights_path: str
    fork_from: str
    def __init__(self, model: _Optional[str] = ..., role: _Optional[_Union[_common_pb2.InstanceRole, str]] = ..., job_id: _Optional[str] = ..., task_id: _Optional[str] = ..., tensor_parallel_size: _Optional[int] = ..., weights_source: _Optional[_Union[_common_pb2.WeightsSource, str]] = ..., weights_path: _Optional[str] = ..., fork_from: _Optional[str] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ("instance_id", "load_seconds", "steps", "weights_source")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SOURCE_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    load_seconds: float
    steps: _containers.RepeatedCompositeFieldContainer[_common_pb2.ScaleStepTiming]
    weights_source: _common_pb2.WeightsSource
    def __init__(self, instance_id: _Optional[str] = ..., load_seconds: _Optional[float] = ..., steps: _Optional[_Iterable[_Union[_common_pb2.ScaleStepTiming, _Mapping]]] = ..., weights_source: _Optional[_Union[_common_pb2.WeightsSource, str]] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StreamWeightsRequest(_message.Message):
    __slots__ = ("model", "tensor_parallel_size", "max_chunk_bytes", "host_id", "shared_memory_dir", "bulk_tcp")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_DIR_FIELD_NUMBER: _ClassVar[int]
    BULK_TCP_FIELD_NUMBER: _ClassVar[int]
    model: str
    tensor_parallel_size: int
    max_chunk_bytes: int
    host_id: str
    shared_memory_dir: str
    bulk_tcp: bool
    def __init__(self, model: _Optional[str] = ..., tensor_parallel_size: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ..., host_id: _Optional[str] = ..., shared_memory_dir: _Optional[str] = ..., bulk_tcp: _Optional[bool] = ...) -> None: ...

class StreamWeightsResponse(_message.Message):
    __slots__ = ("manifest", "chunk", "shared_memory_file", "bulk_offer")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FILE_FIELD_NUMBER: _ClassVar[int]
    BULK_OFFER_FIELD_NUMBER: _ClassVar[int]
    manifest: WeightsManifest
    chunk: WeightsChunk
    shared_memory_file: str
    bulk_offer: BulkOffer
    def __init__(self, manifest: _Optional[_Union[WeightsManifest, _Mapping]] = ..., chunk: _Optional[_Union[WeightsChunk, _Mapping]] = ..., shared_memory_file: _Optional[str] = ..., bulk_offer: _Optional[_Union[BulkOffer, _Mapping]] = ...) -> None: ...

class BulkOffer(_message.Message):
    __slots__ = ("address", "token", "nbytes")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    address: str
    token: bytes
    nbytes: int
    def __init__(self, address: _Optional[str] = ..., token: _Optional[bytes] = ..., nbytes: _Optional[int] = ...) -> None: ...

class WeightsManifest(_message.Message):
    __slots__ = ("tensors", "total_bytes")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[WeightTensor]
    total_bytes: int
    def __init__(self, tensors: _Optional[_Iterable[_Union[WeightTensor, _Mapping]]] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class WeightTensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "offset", "nbytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    nbytes: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class WeightsChunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class RunTrainingRequest(_message.Message):
    __slots__ = ("job_id", "base_model", "dataset_artifact", "output_model", "n_epochs", "batch_size", "learning_rate", "lora_rank", "lora_alpha", "seed", "checkpoint_every_steps", "checkpoint_prefix", "resume_checkpoint", "adapter_only")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    DATASET_ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_MODEL_FIELD_NUMBER: _ClassVar[int]
    N_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_STEPS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_PREFIX_FIELD_NUMBER: _ClassVar[int]
    RESUME_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ONLY_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    base_model: str
    dataset_artifact: str
    output_model: str
    n_epochs: int
    batch_size: int
    learning_rate: float
    lora_rank: int
    lora_alpha: int
    seed: int
    checkpoint_every_steps: int
    checkpoint_prefix: str
    resume_checkpoint: str
    adapter_only: bool
    def __init__(self, job_id: _Optional[str] = ..., base_model: _Optional[str] = ..., dataset_artifact: _Optional[str] = ..., output_model: _Optional[str] = ..., n_epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., lora_rank: _Optional[int] = ..., lora_alpha: _Optional[int] = ..., seed: _Optional[int] = ..., checkpoint_every_steps: _Optional[int] = ..., checkpoint_prefix: _Optional[str] = ..., resume_checkpoint: _Optional[str] = ..., adapter_only: _Optional[bool] = ...) -> None: ...

class RunTrainingResponse(_message.Message):
    __slots__ = ("step", "checkpoint", "evaluation", "done")
    STEP_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    step: TrainingStep
    checkpoint: TrainingCheckpoint
    evaluation: TrainingEvaluation
    done: TrainingDone
    def __init__(self, step: _Optional[_Union[TrainingStep, _Mapping]] = ..., checkpoint: _Optional[_Union[TrainingCheckpoint, _Mapping]] = ..., evaluation: _Optional[_Union[TrainingEvaluation, _Mapping]] = ..., done: _Optional[_Union[TrainingDone, _Mapping]] = ...) -> None: ...

class TrainingStep(_message.Message):
    __slots__ = ("step", "total_steps", "train_loss", "tokens", "trained_tokens", "seconds", "learning_rate")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRAINED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    train_loss: float
    tokens: int
    trained_tokens: int
    seconds: float
    learning_rate: float
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., train_loss: _Optional[float] = ..., tokens: _Optional[int] = ..., trained_tokens: _Optional[int] = ..., seconds: _Optional[float] = ..., learning_rate: _Optional[float] = ...) -> None: ...

class TrainingCheckpoint(_message.Message):
    __slots__ = ("step", "artifact", "train_loss")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    step: int
    artifact: str
    train_loss: float
    def __init__(self, step: _Optional[int] = ..., artifact: _Optional[str] = ..., train_loss: _Optional[float] = ...) -> None: ...

class TrainingEvaluation(_message.Message):
    __slots__ = ("when", "valid_loss", "examples")
    WHEN_FIELD_NUMBER: _ClassVar[int]
    VALID_LOSS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    when: str
    valid_loss: float
    examples: int
    def __init__(self, when: _Optional[str] = ..., valid_loss: _Optional[float] = ..., examples: _Optional[int] = ...) -> None: ...

class TrainingDone(_message.Message):
    __slots__ = ("model_dir", "model", "trained_tokens", "steps", "adapter_dir")
    MODEL_DIR_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TRAINED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_DIR_FIELD_NUMBER: _ClassVar[int]
    model_dir: str
    model: str
    trained_tokens: int
    steps: int
    adapter_dir: str
    def __init__(self, model_dir: _Optional[str] = ..., model: _Optional[str] = ..., trained_tokens: _Optional[int] = ..., steps: _Optional[int] = ..., adapter_dir: _Optional[str] = ...) -> None: ...
