"""KV tensors in the executor's host layout and a sink that records what the engine would get."""

from __future__ import annotations

import torch

# [layers, 2, blocks, block_size, kv_heads, head_dim], the executor's host layout.
SHAPE = (3, 2, 5, 4, 2, 8)


def kv(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(dtype)


class RecordingSink:
    """A KVSink that copies into a block-indexed tensor (as the engine's copy does), so
    reassembly can be compared."""

    def __init__(self, like: torch.Tensor, num_blocks: int) -> None:
        shape = list(like.shape)
        shape[2] = num_blocks
        self.data = torch.full(shape, float("nan"), dtype=torch.float32)
        self.writes: list[tuple[int, int]] = []

    async def write(self, first_block: int, tensor: torch.Tensor) -> None:
        n = tensor.shape[2]
        self.data[:, :, first_block : first_block + n] = tensor.float()
        self.writes.append((first_block, n))
