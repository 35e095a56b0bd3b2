"""A decoder layer's elementwise steps: RMSNorm (after the residual add), rotary, SiLU-and-mul.

`EagerLayerOps` runs them as torch ops on any device. `FusedLayerOps` runs each as one C++
kernel on CPU (`kernels/fused_layer_ops`), adding into the residual and rotating q and k in
place. The model picks one at load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deepserve.flowserve.kernels import fused_layer_ops
from deepserve.flowserve.model.rotary import RotaryEmbedding


class EagerLayerOps:
    def __init__(self, rotary: RotaryEmbedding, hidden_size: int, eps: float) -> None:
        self.rotary = rotary
        self.norm_shape = (hidden_size,)
        self.eps = eps
        self._cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None

    def begin_step(self, positions: torch.Tensor) -> None:
        """Look up this step's rotations once for all layers."""
        self._cos_sin = self.rotary.cos_sin(positions)

    def add_norm(
        self, residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + delta, RMSNorm of it); no add when delta is None."""
        if delta is not None:
            residual = residual + delta
        return residual, F.rms_norm(residual, self.norm_shape, weight, self.eps)

    def rotate(self, qk: torch.Tensor) -> torch.Tensor:
        """q and k heads [tokens, heads, head_dim] rotated (a new tensor)."""
        assert self._cos_sin is not None
        return RotaryEmbedding.rotate(qk, *self._cos_sin)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class FusedLayerOps(EagerLayerOps):
    def begin_step(self, positions: torch.Tensor) -> None:
        self._positions = positions

    def add_norm(
        self, residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if delta is None:
            return residual, fused_layer_ops.rms_norm(residual, weight, self.eps)
        # The residual is the step's own tensor (the embedding's output): adding in place is safe.
        return residual, fused_layer_ops.add_rms_norm(residual, delta, weight, self.eps)

    def rotate(self, qk: torch.Tensor) -> torch.Tensor:
        fused_layer_ops.rotary_(qk, self._positions, self.rotary.cos_half, self.rotary.sin_half)
        return qk

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return fused_layer_ops.silu_mul(gate_up)


def layer_ops(
    rotary: RotaryEmbedding, hidden_size: int, eps: float, device: torch.device, dtype: torch.dtype
) -> EagerLayerOps:
    if (
        device.type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and fused_layer_ops.available()
    ):
        return FusedLayerOps(rotary, hidden_size, eps)
    return EagerLayerOps(rotary, hidden_size, eps)
