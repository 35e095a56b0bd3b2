"""KV chunks: a run of prompt blocks for a run of layers, cut to fit a message.

Tensors use the executor's host layout: [layers, 2, blocks, block_size, kv_heads, head_dim]
(the fake executor's is [1, 1, blocks, block_size]); layers are axis 0, blocks axis 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYER_DIM = 0
BLOCK_DIM = 2


@dataclass(slots=True)
class KVChunk:
    """KV of prompt blocks [first_block, +num_blocks) for layers [layer_start, +num_layers)."""

    first_block: int
    layer_start: int
    # Layers of the full KV tensor; a receiver writes a block run once all have arrived.
    total_layers: int
    tensor: torch.Tensor

    @property
    def num_blocks(self) -> int:
        return int(self.tensor.shape[BLOCK_DIM])

    @property
    def num_layers(self) -> int:
        return int(self.tensor.shape[LAYER_DIM])

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


def split_by_blocks(
    tensor: torch.Tensor,
    first_block: int,
    max_bytes: int,
    *,
    layer_start: int = 0,
    total_layers: int | None = None,
) -> list[KVChunk]:
    """Cut a KV tensor along the block axis into chunks of at most max_bytes (>= 1 block each)."""
    num_blocks = int(tensor.shape[BLOCK_DIM])
    total = total_layers if total_layers is not None else int(tensor.shape[LAYER_DIM])
    if num_blocks == 0:
        return []
    per_block = max(1, tensor.numel() * tensor.element_size() // num_blocks)
    step = max(1, max_bytes // per_block)
    return [
        KVChunk(
            first_block=first_block + start,
            layer_start=layer_start,
            total_layers=total,
            tensor=tensor.narrow(BLOCK_DIM, start, min(step, num_blocks - start)),
        )
        for start in range(0, num_blocks, step)
    ]


def split_by_layers(tensor: torch.Tensor, first_block: int, max_bytes: int) -> list[KVChunk]:
    """One or more chunks per layer (layer-by-layer mode over an already computed tensor)."""
    total = int(tensor.shape[LAYER_DIM])
    chunks: list[KVChunk] = []
    for layer in range(total):
        chunks.extend(
            split_by_blocks(
                tensor.narrow(LAYER_DIM, layer, 1),
                first_block,
                max_bytes,
                layer_start=layer,
                total_layers=total,
            )
        )
    return chunks
