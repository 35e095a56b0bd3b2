"""The Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) written for a paged KV cache.

All of a step's tokens, of all its sequences, run as one flat [tokens, hidden] tensor, so every linear
layer is one matmul per step. Plain tensors instead of nn.Modules keep per-layer Python overhead
low, which dominates small models on CPU. With tensor parallelism each rank holds its share of
heads and MLP columns and all-reduces after the row-parallel o_proj and down_proj.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from deepserve.flowserve.kernels import paged_decode, paged_prefill
from deepserve.flowserve.lora.batched_matmul import LoRAStep
from deepserve.flowserve.model.attention import AttentionMetadata, paged_attention, write_kv
from deepserve.flowserve.model.config import ModelConfig
from deepserve.flowserve.model.layer_ops import layer_ops
from deepserve.flowserve.model.linear_kernel import OneDNNLinear, linear_kernel
from deepserve.flowserve.model.llama_weights import LlamaWeights
from deepserve.flowserve.model.native_decode import NativeDecode
from deepserve.flowserve.model.rotary import RotaryEmbedding
from deepserve.flowserve.model.weights import load_llama_weights

KVCaches = Sequence[tuple[torch.Tensor, torch.Tensor]]
ROW_BUCKET = 64


class LlamaForCausalLM:
    """One rank's Llama decoder: flat tokens in, hidden states out; logits for chosen rows."""

    def __init__(
        self,
        config: ModelConfig,
        weights: LlamaWeights,
        *,
        device: torch.device,
        dtype: torch.dtype,
        tp_rank: int = 0,
        tp_size: int = 1,
        tp_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.config = config
        self.weights = weights
        self.device = device
        self.dtype = dtype
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.tp_group = tp_group
        self.num_heads = config.num_heads // tp_size
        self.num_kv_heads = config.num_kv_heads // tp_size
        self.rotary = RotaryEmbedding(config, device, dtype)
        self.ops = layer_ops(self.rotary, config.hidden_size, config.rms_norm_eps, device, dtype)
        self.linear = linear_kernel(device, dtype)
        # Decodes read the paged cache in place (C++) where that kernel is built for this host.
        self.fused_decode = (
            device.type == "cpu"
            and dtype in (torch.float32, torch.bfloat16)
            and paged_decode.available()
        )
        # Prefill chunks too, in the dtypes where the kernel beats SDPA's flash kernel.
        self.fused_prefill = (
            device.type == "cpu"
            and config.head_dim in paged_prefill.HEAD_SIZES
            and paged_prefill.serves(dtype)
        )
        # Prefill steps' rows rounded up to a multiple of this (0: never). oneDNN builds a
        # primitive for every new row count, ~13 ms per weight shape at 1500 rows in bfloat16
        # (~2 ms in float32, less than the padding costs); buckets bound the builds.
        self.row_bucket = (
            ROW_BUCKET if isinstance(self.linear, OneDNNLinear) and dtype == torch.bfloat16 else 0
        )
        if isinstance(self.linear, OneDNNLinear):
            # Reordered over the first steps, layer by layer; lm_head (the largest) last.
            for layer in weights.layers:
                self.linear.register([layer.qkv, layer.o_proj, layer.gate_up, layer.down])
            if weights.lm_head is not None:
                self.linear.register([weights.lm_head])
        # Decode-only steps run every layer in one native call where it serves them.
        self.native_decode = NativeDecode.for_model(
            config,
            weights,
            self.linear,
            self.rotary,
            self.num_heads,
            self.num_kv_heads,
            device=device,
            dtype=dtype,
            tp_size=tp_size,
        )

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        config: ModelConfig,
        *,
        device: torch.device,
        dtype: torch.dtype,
        tp_rank: int = 0,
        tp_size: int = 1,
        tp_group: dist.ProcessGroup | None = None,
    ) -> LlamaForCausalLM:
        weights = load_llama_weights(
            model_dir, config, device=device, dtype=dtype, tp_rank=tp_rank, tp_size=tp_size
        )
        return cls(
            config,
            weights,
            device=device,
            dtype=dtype,
            tp_rank=tp_rank,
            tp_size=tp_size,
            tp_group=tp_group,
        )

    @torch.inference_mode()
    def forward(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: KVCaches,
        max_position: int | None = None,
        after_layer: Callable[[int], None] | None = None,
        lora: LoRAStep | None = None,
    ) -> torch.Tensor:
        """Run all layers over token_ids [tokens]; writes their KV; returns [tokens, hidden].

        `after_layer(i)` runs once layer i's KV is written (layer-by-layer KV transfer).
        `lora` adds each adapter token's LoRA delta to every fused projection.
        """
        if isinstance(self.linear, OneDNNLinear) and self.linear.pending:
            self.linear.pack_some()
        if max_position is None:
            max_position = int(positions.max().item())
        self.rotary.ensure_length(max_position)
        real_tokens = token_ids.shape[0]
        rows = self._padded_rows(real_tokens, meta, lora)
        if rows > real_tokens:
            # Padding rows (token 0 at position 0) go through every row-wise op; no attention
            # reads them, their KV is not written, and they are cut off the result.
            token_ids = F.pad(token_ids, (0, rows - real_tokens))
            positions = F.pad(positions, (0, rows - real_tokens))
        residual = F.embedding(token_ids, self.weights.embed)
        native = self.native_decode
        if native is not None and lora is None and after_layer is None and rows == real_tokens:
            stack = native.stack(rows, meta)
            if stack is not None:
                return native.run(stack, residual, positions, meta, kv_caches)
        ops = self.ops
        ops.begin_step(positions)
        num_tokens = residual.shape[0]
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.config.head_dim
        q_size, kv_size = heads * head_dim, kv_heads * head_dim
        # Each sublayer's output joins the residual in the next norm (one fused pass on CPU).
        pending: torch.Tensor | None = None
        layers = zip(self.weights.layers, kv_caches, strict=True)
        for index, (layer, (key_cache, value_cache)) in enumerate(layers):
            residual, x = ops.add_norm(residual, pending, layer.input_norm)
            qkv = self.linear(x, layer.qkv, layer.qkv_bias)
            if lora is not None:
                lora.add("qkv", index, x, qkv)
            # q and k heads rotate together: one set of kernels instead of two.
            qk = ops.rotate(qkv[:, : q_size + kv_size].view(num_tokens, heads + kv_heads, head_dim))
            key = qk[:, heads:]
            value = qkv[:, q_size + kv_size :].view(num_tokens, kv_heads, head_dim)
            write_kv(
                key_cache, value_cache, meta.slot_mapping, key[:real_tokens], value[:real_tokens]
            )
            attn = paged_attention(
                qk[:, :heads],
                key_cache,
                value_cache,
                meta,
                key,
                value,
                fused_decode=self.fused_decode,
            )
            attn_out = self._row_parallel(attn, layer.o_proj, layer.o_bias)
            if lora is not None:
                lora.add("o", index, attn, attn_out)

            residual, x = ops.add_norm(residual, attn_out, layer.post_norm)
            gate_up = self.linear(x, layer.gate_up, layer.gate_up_bias)
            if lora is not None:
                lora.add("gate_up", index, x, gate_up)
            act = ops.silu_mul(gate_up)
            mlp_out = self._row_parallel(act, layer.down, layer.down_bias)
            if lora is not None:
                lora.add("down", index, act, mlp_out)
            pending = mlp_out
            if after_layer is not None:
                after_layer(index)
        hidden = residual if pending is None else residual + pending
        return hidden[:real_tokens]

    def _padded_rows(self, num_tokens: int, meta: AttentionMetadata, lora: LoRAStep | None) -> int:
        """The step's row count after bucketing: only steps with prefill chunks (decode-only
        steps have few distinct sizes) and without LoRA (its deltas index the real rows)."""
        bucket = self.row_bucket
        if not bucket or num_tokens <= bucket or lora is not None:
            return num_tokens
        if not meta.prefills and meta.prefill_batch is None:
            return num_tokens
        return -(-num_tokens // bucket) * bucket

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + lm_head over the selected rows [n, hidden] -> [n, vocab] (rank 0 only)."""
        if self.weights.lm_head is None:
            raise RuntimeError("only tensor-parallel rank 0 holds lm_head")
        x = F.rms_norm(
            hidden, (self.config.hidden_size,), self.weights.final_norm, self.config.rms_norm_eps
        )
        return self.linear(x, self.weights.lm_head, None)

    def _row_parallel(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        out = self.linear(x, weight, None)
        if self.tp_size > 1:
            dist.all_reduce(out, group=self.tp_group)
        if bias is not None:
            out = out + bias  # after the reduce, or it would be counted tp_size times
        return out
