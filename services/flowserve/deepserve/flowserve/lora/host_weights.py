"""An adapter read from its PEFT files into host memory, in the slots' fused layout.

This is the host-DRAM tier's unit: built off the engine loop (a worker thread), kept in the
`AdapterHostCache`, and copied into a device slot in one step when a request needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from deepserve.adapters.peft_format import WEIGHTS_FILE, BaseShape, inspect_adapter
from deepserve.flowserve.lora.layout import FUSED_TARGETS, projection_shapes


@dataclass(slots=True)
class AdapterWeights:
    """One adapter: per fused projection A [layers, in, targets * R], and per target of it
    B [layers, R, out]."""

    adapter_id: str
    rank: int
    a: dict[str, torch.Tensor]
    b: dict[str, list[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        tensors = [*self.a.values(), *(t for bs in self.b.values() for t in bs)]
        return sum(t.numel() * t.element_size() for t in tensors)


def load_adapter_weights(
    adapter_id: str,
    path: str | Path,
    base: BaseShape,
    *,
    max_rank: int,
    dtype: torch.dtype,
) -> AdapterWeights:
    """Check the adapter (InvalidArgument with the reason) and build its fused host tensors."""
    spec = inspect_adapter(path, base, max_rank)
    shapes = projection_shapes(base.hidden_size, base.intermediate_size, base.q_size, base.kv_size)
    layers, r, width = base.num_layers, spec.rank, max_rank
    a: dict[str, torch.Tensor] = {}
    b: dict[str, list[torch.Tensor]] = {}
    for fused, targets in FUSED_TARGETS.items():
        shape = shapes[fused]
        a[fused] = torch.zeros(layers, shape.in_features, width * len(targets), dtype=dtype)
        b[fused] = [torch.zeros(layers, width, out, dtype=dtype) for out in shape.out_features]
    with safe_open(str(Path(path) / WEIGHTS_FILE), framework="pt") as f:
        for fused, targets in FUSED_TARGETS.items():
            for t_index, target in enumerate(targets):
                cols = slice(t_index * width, t_index * width + r)
                for layer in range(layers):
                    a_name = spec.tensor_names.get((layer, target, "A"))
                    if a_name is None:
                        continue
                    lora_a = f.get_tensor(a_name)  # [r, in]
                    lora_b = f.get_tensor(spec.tensor_names[(layer, target, "B")])  # [out, r]
                    a[fused][layer, :, cols] = lora_a.t().to(dtype)
                    b[fused][t_index][layer, :r] = (lora_b.t().float() * spec.scaling).to(dtype)
    return AdapterWeights(adapter_id=adapter_id, rank=r, a=a, b=b)
