"""Adapter slots on the device: every projection's A and B stacked over a fixed number of slots.

Allocated on the first adapter load (an instance that never serves an adapter pays nothing).
Writing a slot is a copy into a slice; the engine picks slots no running request uses, and the
copy runs on the forward thread in submission order, so it never races a step that reads it.
"""

from __future__ import annotations

import torch

from deepserve.flowserve.lora.host_weights import AdapterWeights
from deepserve.flowserve.lora.layout import FUSED_TARGETS, ProjectionShape


class LoRASlots:
    """Per fused projection: A [layers, slots, in, targets * R]; per target B [layers, slots,
    R, out] and the target's first column in the fused output."""

    def __init__(
        self,
        shapes: dict[str, ProjectionShape],
        *,
        num_layers: int,
        num_slots: int,
        max_rank: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, list[torch.Tensor]] = {}
        self.out_offsets: dict[str, list[int]] = {}
        for fused, targets in FUSED_TARGETS.items():
            shape = shapes[fused]
            width = max_rank * len(targets)
            self.a[fused] = torch.zeros(
                num_layers, num_slots, shape.in_features, width, device=device, dtype=dtype
            )
            self.b[fused] = [
                torch.zeros(num_layers, num_slots, max_rank, out, device=device, dtype=dtype)
                for out in shape.out_features
            ]
            offsets, start = [], 0
            for out in shape.out_features:
                offsets.append(start)
                start += out
            self.out_offsets[fused] = offsets

    def write(self, slot: int, weights: AdapterWeights) -> None:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} outside [0, {self.num_slots})")
        for fused in FUSED_TARGETS:
            self.a[fused][:, slot].copy_(weights.a[fused], non_blocking=True)
            for device_b, host_b in zip(self.b[fused], weights.b[fused], strict=True):
                device_b[:, slot].copy_(host_b, non_blocking=True)
