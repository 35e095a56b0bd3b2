"""Decode-only steps through every layer in one native call (`kernels/decode_layers`), on CPU.

The Python layer loop crosses into torch ~10 times a layer; at batch 1 on a small model that
was ~3 ms of a ~28 ms step (bench/RESULTS.md, issue #19). The native op runs the same kernels in
the same order, so it serves exactly the steps the loop would run on them: decode-only, at most
the skinny kernel's rows, every weight packed into its panels, one rank, no LoRA, no per-layer
hook. Any other step takes the loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deepserve.flowserve.kernels import decode_layers
from deepserve.flowserve.model.attention import AttentionMetadata
from deepserve.flowserve.model.config import ModelConfig
from deepserve.flowserve.model.linear_kernel import OneDNNLinear
from deepserve.flowserve.model.llama_weights import LlamaWeights
from deepserve.flowserve.model.rotary import RotaryEmbedding


class NativeDecode:
    """One model's decode steps on the native op, once its weights are packed."""

    def __init__(
        self,
        config: ModelConfig,
        weights: LlamaWeights,
        linear: OneDNNLinear,
        rotary: RotaryEmbedding,
        heads: int,
        kv_heads: int,
    ) -> None:
        self._config = config
        self._weights = weights
        self._linear = linear
        self._rotary = rotary
        self._heads = heads
        self._kv_heads = kv_heads
        self._stack: decode_layers.LayerStack | None = None

    @classmethod
    def for_model(
        cls,
        config: ModelConfig,
        weights: LlamaWeights,
        linear: object,
        rotary: RotaryEmbedding,
        heads: int,
        kv_heads: int,
        *,
        device: torch.device,
        dtype: torch.dtype,
        tp_size: int,
    ) -> NativeDecode | None:
        """The native path where it can serve this model, else None."""
        if (
            device.type != "cpu"
            or tp_size != 1
            or not isinstance(linear, OneDNNLinear)
            or linear.skinny_rows == 0
            or not decode_layers.available(dtype)
        ):
            return None
        return cls(config, weights, linear, rotary, heads, kv_heads)

    def stack(self, rows: int, meta: AttentionMetadata) -> decode_layers.LayerStack | None:
        """The layers as the op takes them, when it serves this step; else None."""
        decodes = meta.decodes
        if (
            rows > self._linear.skinny_rows
            or meta.prefills
            or meta.prefill_batch is not None
            or len(decodes) != 1
            or decodes[0].token_indices is not None
        ):
            return None
        if self._stack is None:
            self._stack = self._gather()
        return self._stack

    def run(
        self,
        stack: decode_layers.LayerStack,
        residual: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """Every layer over the embedded tokens; returns the last layer's hidden states."""
        group = meta.decodes[0]
        return decode_layers.decode_layers(
            residual,
            stack,
            [cache for pair in kv_caches for cache in pair],
            decode_layers.DecodeInputs(
                positions,
                meta.slot_mapping,
                group.block_ids,
                group.context_lens,
                self._rotary.cos_half,
                self._rotary.sin_half,
            ),
        )

    def _gather(self) -> decode_layers.LayerStack | None:
        """Every layer's panels and biases; None until the last weight is packed."""
        if self._linear.pending:
            return None
        weights: list[torch.Tensor] = []
        biases: list[torch.Tensor | None] = []
        for layer in self._weights.layers:
            projections = (layer.qkv, layer.o_proj, layer.gate_up, layer.down)
            panels = [self._linear.panels(weight) for weight in projections]
            if any(panel is None for panel in panels):
                return None
            weights += decode_layers.layer_entries(
                layer.input_norm, [p for p in panels if p is not None], layer.post_norm
            )
            biases += [layer.qkv_bias, layer.o_bias, layer.gate_up_bias, layer.down_bias]
        config = self._config
        return decode_layers.LayerStack(
            weights,
            biases,
            self._heads,
            self._kv_heads,
            self._weights.layers[0].down.shape[1],
            config.rms_norm_eps,
            config.head_dim**-0.5,
        )
