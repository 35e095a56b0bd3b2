"""How one adapter's LoRA weights are laid out to match the engine's fused projections.

The decoder fuses q/k/v into one matmul and gate/up into another, so an adapter's A matrices of
those targets are stacked side by side ([in, 3R] for q/k/v: the shrink is one matmul over the
shared input); each target keeps its own B ([R, out]: the expand writes that target's columns of
the fused output, with no zero blocks to read). Every target is R = the platform's rank limit
wide; a lower-rank adapter is zero-padded, and a target the adapter leaves out is all zeros.
Scaling (alpha / r) is folded into B.
"""

from __future__ import annotations

from dataclasses import dataclass

# Fused projection -> the adapter targets it holds, in output order.
FUSED_TARGETS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


@dataclass(frozen=True, slots=True)
class ProjectionShape:
    """One fused projection: input features and each target's output features."""

    in_features: int
    out_features: tuple[int, ...]

    @property
    def out_total(self) -> int:
        return sum(self.out_features)


def projection_shapes(
    hidden: int, intermediate: int, q_size: int, kv_size: int
) -> dict[str, ProjectionShape]:
    return {
        "qkv": ProjectionShape(hidden, (q_size, kv_size, kv_size)),
        "o": ProjectionShape(q_size, (hidden,)),
        "gate_up": ProjectionShape(hidden, (intermediate, intermediate)),
        "down": ProjectionShape(intermediate, (hidden,)),
    }
