"""An adapter read from its PEFT files into host memory, in the slots' fused layout.

This is the host-DRAM tier's unit: built off the engine loop (a worker thread), kept in the
`AdapterHostCache`, and copied into a device slot in one step when a request needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

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
    # One read of the whole file, then one copy per target over all its layers at once.
    tensors = load_file(str(Path(path) / WEIGHTS_FILE))
    for fused, targets in FUSED_TARGETS.items():
        for t_index, target in enumerate(targets):
            cols = slice(t_index * width, t_index * width + r)
            present = [n for n in range(layers) if (n, target, "A") in spec.tensor_names]
            if not present:
                continue
            names = spec.tensor_names
            lora_a = torch.stack([tensors[names[(n, target, "A")]] for n in present])
            lora_b = torch.stack([tensors[names[(n, target, "B")]] for n in present])
            index = torch.tensor(present)
            a[fused][index, :, cols] = lora_a.transpose(1, 2).to(dtype)  # [n, in, r]
            b[fused][t_index][index, :r] = (lora_b.transpose(1, 2) * spec.scaling).to(dtype)
    return AdapterWeights(adapter_id=adapter_id, rank=r, a=a, b=b)
