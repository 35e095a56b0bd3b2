"""The flowserve service's settings, read from `DEEPSERVE_FLOWSERVE_*` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from deepserve.config import ServiceSettings


class FlowServeSettings(ServiceSettings):
    """A FlowServe pod: its engine, KV cache, weights loading and reporting."""

    model_config = SettingsConfigDict(env_prefix="DEEPSERVE_FLOWSERVE_", extra="ignore")

    grpc_port: int = 50060
    # An OpenAI-compatible HTTP listener for routers that call model servers directly (an
    # InferencePool's endpoint picker); 0: none (the gateway is the platform's HTTP front).
    http_port: int = 0
    # Pod identity; generated when empty. A pod without a model registers as warm.
    pod_id: str = ""
    # The podpool backend that started this pod (its PodRecord.backend): "local" for processes
    # on this host, "kubernetes" for pods of the Kubernetes backend (its pod template sets it).
    backend: str = "local"
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
    # (The CPU matmul kernel is oneDNN's; DEEPSERVE_FLOWSERVE_ONEDNN_LINEAR=0 keeps F.linear,
    # and DEEPSERVE_FLOWSERVE_CPU_WEIGHT_PREPACK=0 skips the reordered private weight copy.
    # Both are read by model/linear_kernel.py where the model is built.)
    model_cache_dir: Path | None = None
    tensor_parallel_size: int = 1
    # KV blocks on the device; 0 sizes the cache from kv_cache_memory_mb. 2 GiB holds 64
    # sequences of ~700 tokens of a 135M model in float32: 256 MiB starved prefill under load
    # (admission waited for blocks; TTFT p50 went 2-3x above vLLM's). On CPU the pages of
    # unused blocks are never touched, so the size costs memory only as far as it is used.
    kv_cache_blocks: int = 0
    kv_cache_memory_mb: int = 2048
    # Host-DRAM tier for evicted prefix blocks (0 disables it).
    kv_host_blocks: int = 0
    async_scheduling: bool = True
    # Decode steps submitted before the step ahead is sampled; the forward thread samples and
    # feeds them (EngineConfig.chain_steps). Off: each step waits for the engine thread.
    chain_steps: bool = True
    # A JSON line per forward step (start, end, tokens, rows) appended here (rank 0's times).
    # `python -m bench.step_trace FILE` sums it. Unset: no log.
    step_trace_path: Path | None = None
    block_size: int = 16
    max_num_seqs: int = 64
    # Tokens one engine step computes at most (vLLM calls it max_num_batched_tokens); 0: the
    # device's default (1024 on CPU, 2048 on accelerators).
    step_token_budget: int = Field(default=0, ge=0)
    # An idle engine holds its first step for up to this fraction of the step's expected
    # prefill (never longer than the max) so a burst of requests starts together; 0: never.
    admission_window_fraction: float = 0.05
    admission_window_max_s: float = 0.025
    max_queue_len: int = 1024
    # Multi-LoRA (the rank limit is DEEPSERVE_LORA_MAX_RANK, shared with registration):
    # distinct adapters one step may mix, adapter slots on the device, adapters kept in DRAM.
    max_loras: int = 8
    lora_slots: int = 8
    max_cpu_loras: int = 32
    # Seconds between load reports to Redis.
    load_report_interval_s: float = 0.5
    # This host's weights cache (DRAM pre-loading): prepared copies that new instances map.
    weights_cache_dir: Path = Path("/dev/shm/deepserve-weights")
    # Look for a DRAM copy when LoadModel names no weights source.
    use_weights_cache: bool = True
    # Models (catalog names or directories, comma-separated) whose tokenizers a warm pod loads
    # ahead of its LoadModel; the copies in the weights cache are added to them.
    preload_tokenizers: str = ""
    # A warm pod maps the DRAM copies on its host (page tables only) before any LoadModel, up
    # to this many MB in all, so the DRAM path's load skips the mapping (0: never).
    premap_dram_copies_mb: int = 8192
    # How often a warm pod looks for new DRAM copies to map.
    premap_interval_s: float = 2.0
    # Longest a fork (weights streamed from a running instance) may take before disk is used.
    fork_timeout_s: float = 120.0
    # A fork source on this host writes the weights into shared memory instead of streaming.
    fork_shared_memory: bool = True
    # A fork source on another host sends the weights over a plain TCP connection (the gRPC
    # call carries the manifest and the offer) instead of gRPC chunks: ~2.5x faster.
    fork_bulk_tcp: bool = True
    # Run one dummy request before the instance registers (scale-up step 4).
    warmup_request: bool = True
    # Skip that dummy request when the weights are a DRAM copy and the KV cache needs no
    # profiling now (configured, or profiled earlier for this model and device): the copy was
    # prepared and run on this host before, so the dummy request proves nothing new, and in a
    # burst of N loads it costs N forwards on shared cores.
    warmup_skip_on_dram: bool = True
