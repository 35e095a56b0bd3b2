"""Rotary position embedding with a precomputed cos/sin table (plain, linear and llama3 scaling)."""

from __future__ import annotations

import math

import torch

from deepserve.flowserve.model.config import ModelConfig, RopeScaling

# The table grows on demand up to max_position_embeddings; 128k-context models would otherwise
# spend tens of MB on positions a small deployment never reaches.
_INITIAL_TABLE_LEN = 4096


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Per-pair rotation frequencies (float32, [head_dim // 2]), after any scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: keep high frequencies, divide low ones by factor, blend smoothly in between.
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding:
    """Applies RoPE (rotate-half layout, as in HF Llama) to q and k rows at given positions."""

    def __init__(self, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.head_dim = config.head_dim
        self.max_positions = config.max_position_embeddings
        self.device = device
        self.dtype = dtype
        self._inv_freq = inverse_frequencies(
            config.head_dim, config.rope_theta, config.rope_scaling
        )
        self._cos = torch.empty(0, device=device, dtype=dtype)
        self._sin = torch.empty(0, device=device, dtype=dtype)
        self._build(min(_INITIAL_TABLE_LEN, self.max_positions))

    def _build(self, length: int) -> None:
        positions = torch.arange(length, dtype=torch.float32)
        freqs = positions[:, None] * self._inv_freq[None, :]  # float32, like the reference
        # Half-width float32 tables for the fused CPU kernel (kernels/fused_layer_ops).
        self.cos_half = freqs.cos().to(device=self.device)
        self.sin_half = freqs.sin().to(device=self.device)
        cos = self.cos_half.to(dtype=self.dtype)
        sin = self.sin_half.to(dtype=self.dtype)
        # Full head width, sin negated on the first half: rotating is then x * cos plus the
        # half-swapped x * sin, three kernels instead of seven, with the same roundings.
        self._cos = torch.cat((cos, cos), dim=-1)
        self._sin = torch.cat((-sin, sin), dim=-1)

    def ensure_length(self, max_position: int) -> None:
        """Grow the table so that position `max_position` can be looked up."""
        if max_position < self._cos.shape[0]:
            return
        length = self._cos.shape[0]
        while length <= max_position:
            length *= 2
        # Positions past max_position_embeddings still get a rotation; the model just was not
        # trained there. The engine is expected to cap lengths.
        self._build(max(length, max_position + 1))

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin rows for `positions`, [tokens, 1, head_dim], for `rotate`."""
        cos = self._cos.index_select(0, positions).unsqueeze(1)
        sin = self._sin.index_select(0, positions).unsqueeze(1)
        return cos, sin

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [tokens, heads, head_dim] by half-dim pairs (x1, x2) -> (x1c - x2s, x2c + x1s)."""
        # roll swaps the halves; a - b and a + (-b) round alike, so this matches the HF formula.
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin
