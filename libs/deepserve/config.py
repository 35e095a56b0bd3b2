"""Settings for every process, read from `DEEPSERVE_*` environment variables.

One settings object per service, built once in its entry point and passed in; nothing deep in the
code reads the environment. Shared connection settings sit in `CommonSettings`
(`DEEPSERVE_ETCD_ENDPOINT`, ...); a service's own fields carry its name
(`DEEPSERVE_GATEWAY_HTTP_PORT`, `DEEPSERVE_FLOWSERVE_MODEL`, ...).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_run_dir() -> Path:
    return Path.home() / ".deepserve" / "run"


class CommonSettings(BaseSettings):
    """Connections and cross-cutting options every service shares."""

    model_config = SettingsConfigDict(env_prefix="DEEPSERVE_", extra="ignore")

    etcd_endpoint: str = "127.0.0.1:2379"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Pool size per process; callers beyond it wait for a connection instead of failing.
    redis_max_connections: int = 64
    # Seconds one Redis command may take before it counts as failed (hot state: callers degrade).
    redis_socket_timeout_s: float = 30.0
    # Seconds a registration (pod, instance, service) outlives its process's last keep-alive.
    lease_ttl_s: int = 5
    # Where this host's processes listen and advertise themselves.
    host: str = "127.0.0.1"
    otlp_endpoint: str | None = None
    # Local span export (JSON lines) when no OTLP endpoint is set; None disables it.
    telemetry_dir: Path | None = None
    log_level: str = "INFO"
    log_dir: Path | None = None
    # Uploaded files and training artifacts (content-addressed); None: ~/.deepserve/files.
    files_root: Path | None = None
    # Largest file one upload may carry.
    files_max_bytes: int = 512 * 1024 * 1024


class ServiceSettings(BaseSettings):
    """Base of each service's settings: its gRPC port plus the common block."""

    model_config = SettingsConfigDict(extra="ignore")

    common: CommonSettings = Field(default_factory=CommonSettings)
    grpc_port: int = 0
    # Prometheus /metrics port; 0 picks a free one (advertised in the service's etcd record).
    metrics_port: int = 0
    # Seconds in-flight RPCs get to finish after SIGTERM.
    shutdown_grace_s: float = 5.0


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="DEEPSERVE_GATEWAY_", extra="ignore")

    grpc_port: int = 50050
    http_port: int = 8000
    scheduler_address: str = "127.0.0.1:50052"
    # Open mode accepts calls without an API key; meant for the local demo only.
    auth_open: bool = False
    # The tenant that keyless (or unknown-key) calls are charged to in open mode.
    open_tenant: str = "anonymous"
    request_timeout_s: float = 600.0
    # Seconds a Route call to the scheduler may take before the request fails with 503.
    route_timeout_s: float = 5.0
    # Re-routes (to another instance) when an engine fails before its first token.
    generate_retries: int = 1
    # Limits of tenants without a record of their own (0: unlimited).
    default_requests_per_min: int = 0
    default_tokens_per_min: int = 0
    default_max_concurrent: int = 0
    rate_limit_window_s: float = 60.0
    # Completion tokens charged up front against tokens/min when a request sets no max_tokens.
    max_tokens_estimate: int = 256
    # Upper bound of engine requests one API call may fan out to (n times the prompts).
    max_fanout: int = 128
    # Where tokenizers of catalog models are found (the model cache); None: the default cache.
    model_cache_dir: Path | None = None
    # Token block size of the engines' prefix cache, for the prefix hashes sent to Route.
    prefix_block_size: int = 16
    # Scale from zero: how long a request for an autoscaled model with no live instance waits
    # for the first one before a 503 with Retry-After (0 disables holding).
    scale_from_zero_timeout_s: float = 60.0


class JobMgrSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="DEEPSERVE_JOBMGR_", extra="ignore")

    grpc_port: int = 50051
    podpool_address: str = "127.0.0.1:50053"
    # Seconds a dead leader keeps leading; another replica takes over within it.
    election_ttl_s: int = 5
    # Full reconcile pass at least this often, even when no watch event woke the loop.
    resync_interval_s: float = 5.0
    # How long one AcquirePod (claim or cold start, plus model load) may take.
    acquire_timeout_s: float = 300.0
    # First retry delay for a task whose start failed; doubles per failure up to the cap.
    retry_backoff_s: float = 1.0
    retry_backoff_max_s: float = 30.0
    # Seconds between autoscaler passes (held demand wakes it at once).
    autoscale_interval_s: float = 1.0
    # A gateway's demand record counts for this long after its last refresh.
    demand_ttl_s: float = 30.0
    # Recent requests whose latencies count against a deployment's SLOs.
    slo_window_s: float = 30.0


class SchedulerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="DEEPSERVE_SCHEDULER_", extra="ignore")

    grpc_port: int = 50052
    # Policy for models whose deployment names none: deepserve (Algorithm 1), round_robin,
    # random or least_loaded.
    default_policy: str = "deepserve"
    # A group is imbalanced when max - min load exceeds the absolute threshold AND max exceeds
    # min times the relative one; then load wins over cache locality.
    balance_abs_threshold: float = 4.0
    balance_rel_threshold: float = 1.5
    # Load units a full KV cache adds to an instance's queued + running requests.
    kv_load_weight: float = 4.0
    # Seconds between reads of the instances' load reports from Redis.
    load_refresh_s: float = 0.1
    # Decode-length buckets (the paper used 128-token buckets) and the guess with no history.
    decode_bucket_tokens: int = 128
    default_decode_tokens: int = 256
    # Seconds between refreshes of the shared per-(model, tenant) output-length histories.
    history_refresh_s: float = 1.0
    # Longest block of one read of the instances' KV-event streams.
    kv_events_block_ms: int = 100


class PodPoolSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="DEEPSERVE_PODPOOL_", extra="ignore")

    grpc_port: int = 50053
    # Warm (model-less, runtime started) pods the pool keeps ready for the next task. Warm pods
    # started elsewhere (e.g. `deepserve up`'s first pod) count; 0 starts pods only on demand.
    warm_pods: int = 0
    # Upper bound on pods this pool runs at once (warm + assigned + starting).
    max_pods: int = 64
    # Where pods run: "local" (processes on this host); "kubernetes" is the production target.
    backend: str = "local"
    # Seconds a new pod may take to register as warm before it is given up on.
    pod_start_timeout_s: float = 120.0
    # Device for the pods it starts (npu, cuda, cpu; empty picks the best available).
    pod_device: str = ""
    # Where the local backend writes each pod's log; empty uses a temporary folder.
    pod_log_dir: Path | None = None
    # DRAM pre-loading: models whose weights this host always keeps in shared memory
    # (comma-separated names or paths), plus this many recently scaled-up models.
    dram_models: str = ""
    dram_recent_models: int = 2
    # Upper bound on the shared memory the copies may take (0: no bound beyond the host's).
    dram_budget_mb: int = 0
    # The host's weights cache (the pods' DEEPSERVE_FLOWSERVE_WEIGHTS_CACHE_DIR); empty disables
    # DRAM pre-loading.
    weights_cache_dir: Path | None = Path("/dev/shm/deepserve-weights")
    # Fork: let a new instance stream its weights from a running one of the same model.
    fork: bool = True
    # How pods start: "process" (a new Python process each) or "zygote" (forked from one
    # process that imported the runtime once: faster, and pods share its memory pages).
    pod_start: str = "process"
    # GOMP_SPINCOUNT for the pods (0: leave OpenMP's default, 300k). A short spin helps only
    # where pods with several threads each are packed beyond the cores: 16 concurrent DRAM-path
    # loads of 2-thread pods on 2 cores took 8 s with the default and 2.6 s with 20k. It costs a
    # pod that has its cores: a training job ran 5-9% slower with 20k (bench/finetune.py). With
    # one thread per pod (pod_threads=1, how packed bursts run best) OpenMP never spins. A
    # GOMP_SPINCOUNT or OMP_WAIT_POLICY in the environment wins.
    pod_openmp_spin_count: int = 0
    # CPU threads per pod (0: one per core). Pods packed many to a core (a burst of 64 on a
    # small host) run better with 1 each: no OpenMP team waits on a descheduled partner.
    pod_threads: int = 0
    # Model loads (LoadModel on a claimed pod) run at once on this host; the rest queue (0: no
    # bound). Loads share the host's cores: a bound brings the first instances up sooner.
    max_concurrent_loads: int = 0


class FlowServeSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="DEEPSERVE_FLOWSERVE_", extra="ignore")

    grpc_port: int = 50060
    # Pod identity; generated when empty. A pod without a model registers as warm.
    pod_id: str = ""
    # Catalog name or model directory to load at start; empty starts a warm, model-less pod.
    model: str = ""
    role: str = "colocated"
    # npu, cuda or cpu; empty picks the best available.
    device: str = ""
    # Weights, activations and KV cache: float32, bfloat16 or float16; empty: the device's
    # default (float32 on CPU, where bfloat16 pays off only with AMX or avx512_bf16).
    dtype: str = ""
    # CPU threads of the forward pass and of training (0: torch's default, one per core).
    threads: int = 0
    model_cache_dir: Path | None = None
    tensor_parallel_size: int = 1
    # KV blocks on the device; 0 sizes the cache from kv_cache_memory_mb.
    kv_cache_blocks: int = 0
    kv_cache_memory_mb: int = 256
    # Host-DRAM tier for evicted prefix blocks (0 disables it).
    kv_host_blocks: int = 0
    async_scheduling: bool = True
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_queue_len: int = 1024
    # Seconds between load reports to Redis.
    load_report_interval_s: float = 0.5
    # This host's weights cache (DRAM pre-loading): prepared copies that new instances map.
    weights_cache_dir: Path = Path("/dev/shm/deepserve-weights")
    # Look for a DRAM copy when LoadModel names no weights source.
    use_weights_cache: bool = True
    # Models (catalog names or directories, comma-separated) whose tokenizers a warm pod loads
    # ahead of its LoadModel; the copies in the weights cache are added to them.
    preload_tokenizers: str = ""
    # Longest a fork (weights streamed from a running instance) may take before disk is used.
    fork_timeout_s: float = 120.0
    # A fork source on this host writes the weights into shared memory instead of streaming.
    fork_shared_memory: bool = True
    # Run one dummy request before the instance registers (scale-up step 4).
    warmup_request: bool = True
