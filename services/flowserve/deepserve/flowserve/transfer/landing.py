"""Where a transfer's TCP KV bytes land: one tensor shaped like the whole transfer, over a
reused host buffer, each chunk read straight into its slice.

A fresh tensor per chunk costs a page fault per 4 KiB on every transfer (expensive on a VM),
and joining the chunks at the end costs another allocation and copy. Here the socket fills the
final place of every byte (`recvmsg_into` over the slice's contiguous runs), so the finished
block runs are written to the engine as views of the landing tensor, and its memory, touched
once, serves the next transfer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from deepserve.errors import InvalidArgument
from deepserve.flowserve.transfer.chunks import BLOCK_DIM, LAYER_DIM
from deepserve.flowserve.transfer.codec import byte_runs, storage_view

# Buffers are sized in steps of this, so transfers of near sizes share them.
_GRAIN = 1 << 20


class LandingPool:
    """Host buffers for landing tensors, kept between transfers up to `keep_bytes` in all
    (one engine's pool; used from its event loop only)."""

    def __init__(self, keep_bytes: int) -> None:
        self.keep_bytes = keep_bytes
        self._free: list[torch.Tensor] = []

    @property
    def kept_bytes(self) -> int:
        return sum(b.numel() for b in self._free)

    def take(self, nbytes: int) -> torch.Tensor:
        """A flat uint8 buffer of at least nbytes: the smallest kept one that fits, else new."""
        fits = [b for b in self._free if b.numel() >= nbytes]
        if fits:
            buffer = min(fits, key=torch.Tensor.numel)
            self._free.remove(buffer)
            return buffer
        return torch.empty(-(-max(nbytes, 1) // _GRAIN) * _GRAIN, dtype=torch.uint8)

    def give(self, buffer: torch.Tensor) -> None:
        """Keeps a buffer no one writes into any more; the smallest go first past the cap."""
        self._free.append(buffer)
        self._free.sort(key=torch.Tensor.numel, reverse=True)
        while self._free and self.kept_bytes > self.keep_bytes:
            self._free.pop()


@dataclass(slots=True)
class KVRoom:
    """A chunk's place in a landing tensor: its bytes in C order are `pieces`, in turn."""

    first_block: int
    num_blocks: int
    layer_start: int
    num_layers: int
    pieces: list[memoryview]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)

    def release(self) -> None:
        for piece in self.pieces:
            piece.release()


class KVLanding:
    """One transfer's landing tensor, [total_layers, 2, blocks, ...] for blocks
    [first_block, first_block + blocks), and which (layer, block) cells have landed."""

    def __init__(
        self,
        pool: LandingPool | None,
        dtype: torch.dtype,
        shape: Sequence[int],
        first_block: int,
    ) -> None:
        nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        self._pool = pool
        self._buffer: torch.Tensor | None = (
            pool.take(nbytes) if pool is not None else torch.empty(nbytes, dtype=torch.uint8)
        )
        self.tensor = self._buffer[:nbytes].view(dtype).view(tuple(shape))
        self.first_block = first_block
        self._bytes = storage_view(self.tensor)
        self._landed = torch.zeros(int(shape[LAYER_DIM]), int(shape[BLOCK_DIM]), dtype=torch.bool)
        self._taken = torch.zeros(int(shape[BLOCK_DIM]), dtype=torch.bool)

    @property
    def total_layers(self) -> int:
        return int(self.tensor.shape[LAYER_DIM])

    @property
    def num_blocks(self) -> int:
        return int(self.tensor.shape[BLOCK_DIM])

    def room(
        self, first_block: int, layer_start: int, dtype: torch.dtype, shape: Sequence[int]
    ) -> KVRoom:
        """The place of a chunk of `shape` for blocks from first_block, layers from
        layer_start; refused unless it is a slice of this transfer's tensor."""
        full = self.tensor.shape
        block = first_block - self.first_block
        if (
            dtype != self.tensor.dtype
            or len(shape) != len(full)
            or any(shape[d] != full[d] for d in range(len(full)) if d not in (LAYER_DIM, BLOCK_DIM))
            or not 0 <= layer_start <= layer_start + shape[LAYER_DIM] <= full[LAYER_DIM]
            or not 0 <= block <= block + shape[BLOCK_DIM] <= full[BLOCK_DIM]
        ):
            raise InvalidArgument(
                f"KV chunk {list(shape)} of {dtype} at block {first_block}, layer {layer_start} "
                f"does not fit the transfer's {list(full)} of {self.tensor.dtype} from block "
                f"{self.first_block}",
                field="shape",
            )
        view = self.tensor.narrow(LAYER_DIM, layer_start, int(shape[LAYER_DIM])).narrow(
            BLOCK_DIM, block, int(shape[BLOCK_DIM])
        )
        runs = byte_runs(view)
        assert runs is not None  # a slice on two dims of a C-order tensor: few runs
        return KVRoom(
            first_block,
            int(shape[BLOCK_DIM]),
            layer_start,
            int(shape[LAYER_DIM]),
            [self._bytes[offset : offset + n] for offset, n in runs],
        )

    def landed(self, room: KVRoom) -> None:
        """The room's bytes are in place."""
        block = room.first_block - self.first_block
        self._landed[
            room.layer_start : room.layer_start + room.num_layers,
            block : block + room.num_blocks,
        ] = True

    def take_complete_runs(self) -> list[tuple[int, int]]:
        """(first_block, num_blocks) of each longest run of blocks every layer of which has
        landed, not returned by an earlier call."""
        complete = (self._landed.all(dim=0) & ~self._taken).tolist()
        runs: list[tuple[int, int]] = []
        for i, done in enumerate(complete):
            if not done:
                continue
            self._taken[i] = True
            if runs and runs[-1][0] + runs[-1][1] == self.first_block + i:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((self.first_block + i, 1))
        return runs

    def blocks(self, first_block: int, num_blocks: int) -> torch.Tensor:
        """The landed KV of blocks [first_block, +num_blocks), every layer (a view)."""
        return self.tensor.narrow(BLOCK_DIM, first_block - self.first_block, num_blocks)

    def release(self) -> None:
        """Gives the buffer back for the next transfer: only once nothing reads into it and
        what was written from it was copied (a sink copies before `write` returns)."""
        buffer, self._buffer = self._buffer, None
        self._bytes.release()
        if buffer is not None and self._pool is not None:
            self._pool.give(buffer)
