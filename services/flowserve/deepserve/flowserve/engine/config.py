"""Settings of one FlowServe engine (per-step limits, KV cache sizes, queue bound)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class EngineConfig:
    """How big the KV cache is and how much work the engine takes per step and in its queue."""

    block_size: int = 16
    # Device KV blocks; None derives it from kv_cache_memory_bytes (see resolve_num_gpu_blocks).
    num_gpu_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    # Host-DRAM tier for evicted prefix blocks; 0 disables it.
    num_host_blocks: int = 0
    max_num_seqs: int = 64
    # Tokens one step computes at most (prompt chunks and decodes together).
    step_token_budget: int = 2048
    # Context window: prompt + max_tokens must fit.
    max_model_len: int = 4096
    # Requests accepted but not started yet; one more raises ResourceExhausted.
    max_queue_len: int = 1024
    # Schedule step N+1 while step N runs on the device.
    async_scheduling: bool = True
    # With async_scheduling, and an executor that samples on its forward thread: submit a
    # decode step before the one ahead of it is sampled (engine/core.py, runner/step_chain.py).
    chain_steps: bool = True
    # An idle engine holds its first step for up to this fraction of the step's expected
    # prefill time (and at most admission_window_max_s) so a burst of requests arriving a few
    # ms apart starts together (engine/admission_window.py); 0 starts at once.
    admission_window_fraction: float = 0.05
    admission_window_max_s: float = 0.025
    enable_prefix_caching: bool = True
    # Prompt token ids must be below it when set.
    vocab_size: int | None = None
    # Multi-LoRA: distinct adapters one step may mix, device slots, adapters kept in host DRAM,
    # and the slots' rank (the platform's one limit, DEEPSERVE_LORA_MAX_RANK).
    max_loras: int = 8
    lora_slots: int = 8
    max_cpu_loras: int = 32
    max_lora_rank: int = 16

    def resolve_num_gpu_blocks(self, bytes_per_block: int | None = None) -> int:
        """num_gpu_blocks, or as many blocks of `bytes_per_block` as the memory budget holds."""
        if self.num_gpu_blocks is not None:
            return self.num_gpu_blocks
        if self.kv_cache_memory_bytes is None or not bytes_per_block:
            raise ValueError("set num_gpu_blocks, or kv_cache_memory_bytes and bytes_per_block")
        return self.kv_cache_memory_bytes // bytes_per_block

    def validate(self) -> None:
        """Raise ValueError on settings the engine cannot run with."""
        for name in ("block_size", "max_num_seqs", "step_token_budget", "max_model_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.num_gpu_blocks is not None and self.num_gpu_blocks <= 0:
            raise ValueError("num_gpu_blocks must be positive")
        if self.num_host_blocks < 0:
            raise ValueError("num_host_blocks must be >= 0")
        for name in ("max_loras", "lora_slots", "max_cpu_loras", "max_lora_rank"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_loras > self.lora_slots:
            raise ValueError("max_loras cannot exceed lora_slots")
        if self.max_queue_len < 0:
            raise ValueError("max_queue_len must be >= 0")
        if self.admission_window_fraction < 0 or self.admission_window_max_s < 0:
            raise ValueError("the admission window must be >= 0")
