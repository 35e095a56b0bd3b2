"""One rank's Llama-family weights: fused q/k/v and gate/up, sharded for tensor parallelism."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class DecoderLayerWeights:
    """One decoder layer's tensors for one rank, with q/k/v and gate/up fused into one matmul each."""

    input_norm: torch.Tensor
    qkv: torch.Tensor  # [(q + 2 * kv) / tp, hidden]: this rank's q rows, then k rows, then v rows
    qkv_bias: torch.Tensor | None
    o_proj: torch.Tensor  # [hidden, q / tp]
    o_bias: torch.Tensor | None  # replicated: added once, after the all-reduce
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate / tp, hidden]: gate rows, then up rows
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor  # [hidden, intermediate / tp]
    down_bias: torch.Tensor | None


@dataclass(slots=True)
class LlamaWeights:
    """All of one rank's tensors: replicated embeddings and norms, sharded projections."""

    embed: torch.Tensor  # [vocab, hidden], replicated
    layers: list[DecoderLayerWeights]
    final_norm: torch.Tensor
    lm_head: torch.Tensor | None  # [vocab, hidden] on rank 0 only; the embed tensor when tied
