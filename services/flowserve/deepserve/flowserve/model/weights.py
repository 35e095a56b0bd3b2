"""Loads one rank's Llama-family weights from a model directory, whichever form it is in.

A prepared copy (DRAM pre-loading, or the weights a fork received; see prepared_weights) is
mapped as is, already fused and in the device dtype; anything else is read from its safetensors
checkpoint (see checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import torch

from deepserve.errors import InvalidArgument
from deepserve.flowserve.model.checkpoint import read_checkpoint
from deepserve.flowserve.model.config import ModelConfig
from deepserve.flowserve.model.llama_weights import LlamaWeights
from deepserve.flowserve.model.prepared_weights import open_prepared


def load_llama_weights(
    model_dir: str | Path,
    config: ModelConfig,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    tp_rank: int = 0,
    tp_size: int = 1,
) -> LlamaWeights:
    """This rank's weights on `device`: the prepared copy when `model_dir` is one, else the
    checkpoint's shard, fused."""
    config.check_tensor_parallel(tp_size)
    if not 0 <= tp_rank < tp_size:
        raise InvalidArgument(f"tp_rank {tp_rank} outside [0, {tp_size})", field="tp_rank")
    prepared = open_prepared(
        model_dir, config, device=device, dtype=dtype, tp_rank=tp_rank, tp_size=tp_size
    )
    if prepared is not None:
        return prepared
    return read_checkpoint(
        model_dir, config, device=device, dtype=dtype, tp_rank=tp_rank, tp_size=tp_size
    )
