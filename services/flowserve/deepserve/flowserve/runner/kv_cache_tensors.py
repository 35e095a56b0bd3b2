"""The physical paged KV cache of one rank: every layer's K and V blocks in one device tensor.

One [layers, 2, num_blocks, block_size, kv_heads, head_dim] allocation means a block copy, a
swap-out to host or a swap-in touches all layers in a single indexing kernel. The host layout
(`copy_to_host`) is the same tensor restricted to the chosen blocks, so the engine's DRAM tier and
KV transfer can treat it as one opaque tensor per block set.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Sequence

import torch

from deepserve.errors import InvalidArgument
from deepserve.flowserve.model.attention import write_kv


class KVCacheTensors:
    """Per-layer paged K/V tensors [num_blocks, block_size, kv_heads, head_dim] on one device."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise InvalidArgument(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}",
                field="num_blocks",
            )
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        if self.device.type == "cpu":
            self.data = _lazily_zeroed(shape, dtype)
        else:
            self.data = torch.zeros(shape, dtype=dtype, device=device)
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = [
            (self.data[i, 0], self.data[i, 1]) for i in range(num_layers)
        ]

    @staticmethod
    def bytes_per_block(
        *, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        element = torch.empty(0, dtype=dtype).element_size()
        return num_layers * 2 * block_size * num_kv_heads * head_dim * element

    @staticmethod
    def num_blocks_for_memory(
        memory_bytes: int,
        *,
        num_layers: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
    ) -> int:
        """How many whole blocks (all layers, K and V) fit in memory_bytes of one rank."""
        per_block = KVCacheTensors.bytes_per_block(
            num_layers=num_layers,
            block_size=block_size,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            dtype=dtype,
        )
        return max(0, memory_bytes // per_block)

    def key_value(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[layer]

    def write(
        self, layer: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> None:
        """Store key/value [tokens, kv_heads, head_dim] of `layer` at flat slot ids."""
        key_cache, value_cache = self.layers[layer]
        write_kv(key_cache, value_cache, slots.to(self.device), key, value)

    def copy_to_host(self, block_ids: Sequence[int]) -> torch.Tensor:
        """The blocks' KV as a CPU tensor [layers, 2, len(block_ids), block_size, kv_heads, dim]."""
        self._check_ids(block_ids)
        ids = torch.tensor(list(block_ids), dtype=torch.long, device=self.device)
        return self.data.index_select(2, ids).cpu()

    def load_from_host(self, block_ids: Sequence[int], tensor: torch.Tensor) -> None:
        """Write a `copy_to_host`-shaped tensor back into the given (possibly different) blocks."""
        self._check_ids(block_ids)
        expected = (
            self.num_layers,
            2,
            len(block_ids),
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
        )
        if tuple(tensor.shape) != expected:
            raise InvalidArgument(
                f"host KV has shape {tuple(tensor.shape)}, expected {expected}", field="tensor"
            )
        ids = torch.tensor(list(block_ids), dtype=torch.long, device=self.device)
        self.data.index_copy_(2, ids, tensor.to(device=self.device, dtype=self.dtype))

    def _check_ids(self, block_ids: Sequence[int]) -> None:
        for block in block_ids:
            if not 0 <= block < self.num_blocks:
                raise InvalidArgument(
                    f"block id {block} outside [0, {self.num_blocks})", field="block_ids"
                )


def _lazily_zeroed(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled host tensor whose pages the kernel provides on first write.

    The cache must read as zeros (a masked slot times garbage can be NaN), but `torch.zeros`
    writes every page at start-up: 47 MB for a 64-block cache of the default model, and whole
    gigabytes at the default memory budget, for blocks that may never be used. An anonymous
    mapping is zero by definition and costs nothing until a block is written. No huge pages:
    one token writes a block in every layer, spread over the whole cache, so 2 MiB pages would
    zero all of it on the first request (measured: a burst spent a quarter of its CPU in the
    kernel zeroing them).
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # frombuffer keeps `region` alive as long as the tensor (and its views) live.
    return torch.frombuffer(region, dtype=dtype).view(shape)
