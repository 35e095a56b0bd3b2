"""Builds a serving engine for a model directory: executor (SPMD when tp > 1), KV cache sizing,
tokenizer-backed detokenization and the KV event hook. Runs in a worker thread of the shell."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from deepserve.adapters.peft_format import BaseShape
from deepserve.flowserve.engine.async_engine import AsyncEngine
from deepserve.flowserve.engine.config import EngineConfig
from deepserve.flowserve.engine.output_processor import detokenizer_factory_for
from deepserve.flowserve.kv_cache.events import KVEvent
from deepserve.flowserve.lora.host_cache import AdapterHostCache
from deepserve.flowserve.model.config import ModelConfig
from deepserve.flowserve.runner.cpu_threads import intraop_threads
from deepserve.flowserve.runner.device import detect_platform, parse_dtype
from deepserve.flowserve.runner.executor import Executor, MultiprocExecutor, UniprocExecutor
from deepserve.flowserve.runner.host_transport import ExecutorHostTransport
from deepserve.flowserve.runner.kv_cache_tensors import KVCacheTensors
from deepserve.flowserve.sampling.grammar import GrammarCompiler
from deepserve.flowserve.settings import FlowServeSettings
from deepserve.tokenizer import Tokenizer
from deepserve.tokenizer.cache import shared_tokenizers


def engine_dtype(settings: FlowServeSettings) -> torch.dtype:
    """The dtype of weights, activations and KV cache: configured, else the device's default."""
    return parse_dtype(settings.dtype or None, detect_platform(settings.device or None))


def step_token_budget(settings: FlowServeSettings) -> int:
    """Tokens one engine step computes at most: configured, else the device's default."""
    if settings.step_token_budget > 0:
        return settings.step_token_budget
    return detect_platform(settings.device or None).default_step_token_budget


def kv_blocks_for(settings: FlowServeSettings, config: ModelConfig, tp_size: int) -> int:
    if settings.kv_cache_blocks > 0:
        return settings.kv_cache_blocks
    dtype = engine_dtype(settings)
    return KVCacheTensors.num_blocks_for_memory(
        settings.kv_cache_memory_mb * 1024 * 1024,
        num_layers=config.num_layers,
        block_size=settings.block_size,
        num_kv_heads=max(1, config.num_kv_heads // tp_size),
        head_dim=config.head_dim,
        dtype=dtype,
    )


def adapter_cache_for(
    model_dir: Path, config: EngineConfig, dtype: torch.dtype
) -> AdapterHostCache:
    """The host-DRAM tier of LoRA adapters of a single-device engine."""
    return AdapterHostCache(
        BaseShape.from_config_json(model_dir),
        capacity=config.max_cpu_loras,
        max_rank=config.max_lora_rank,
        dtype=dtype,
    )


def build_engine(
    model_dir: Path,
    settings: FlowServeSettings,
    tp_size: int,
    on_kv_event: Callable[[KVEvent], None] | None = None,
) -> tuple[AsyncEngine, Tokenizer, int]:
    """Returns the started engine, its tokenizer and the context window it serves."""
    config = ModelConfig.from_model_dir(model_dir)
    config.check_tensor_parallel(tp_size)
    tokenizer = shared_tokenizers.get(model_dir)  # preloaded by a warm pod, or loaded now
    num_blocks = kv_blocks_for(settings, config, tp_size)
    device = settings.device or None
    dtype = engine_dtype(settings)
    executor: Executor
    if tp_size > 1:
        executor = MultiprocExecutor(
            model_dir,
            tp_size=tp_size,
            num_blocks=num_blocks,
            block_size=settings.block_size,
            device=device,
            dtype=dtype,
            step_trace_path=settings.step_trace_path,
        )
    else:
        # Explicit: this worker thread may have inherited the engine loop's single thread
        # (torch applies the last set_num_threads to new threads), e.g. on a pod's second load.
        executor = UniprocExecutor(
            model_dir,
            num_blocks=num_blocks,
            block_size=settings.block_size,
            device=device,
            dtype=dtype,
            threads=intraop_threads(),
            step_trace_path=settings.step_trace_path,
        )
    max_model_len = config.max_position_embeddings
    engine_config = EngineConfig(
        block_size=settings.block_size,
        num_gpu_blocks=num_blocks,
        num_host_blocks=settings.kv_host_blocks,
        max_num_seqs=settings.max_num_seqs,
        step_token_budget=step_token_budget(settings),
        admission_window_fraction=settings.admission_window_fraction,
        admission_window_max_s=settings.admission_window_max_s,
        max_model_len=max_model_len,
        max_queue_len=settings.max_queue_len,
        async_scheduling=settings.async_scheduling,
        chain_steps=settings.chain_steps,
        vocab_size=config.vocab_size,
        max_loras=settings.max_loras,
        lora_slots=settings.lora_slots,
        max_cpu_loras=settings.max_cpu_loras,
        max_lora_rank=settings.common.lora_max_rank,
    )
    eos = tuple(dict.fromkeys([*config.eos_token_ids, *tokenizer.eos_token_ids]))
    # Structured outputs: grammars compile against this tokenizer (its token trie is built
    # on the first constrained request).
    grammars = GrammarCompiler(
        tokenizer.backend.to_str, max(config.vocab_size, tokenizer.vocab_size), eos
    )
    engine = AsyncEngine(
        engine_config,
        executor,
        eos_token_ids=eos,
        detokenizer_factory=detokenizer_factory_for(tokenizer),
        host_transport=ExecutorHostTransport(executor) if settings.kv_host_blocks > 0 else None,
        kv_event_listener=on_kv_event,
        grammar_compiler=grammars,
        adapter_cache=None if tp_size > 1 else adapter_cache_for(model_dir, engine_config, dtype),
    )
    engine.start()
    return engine, tokenizer, max_model_len
