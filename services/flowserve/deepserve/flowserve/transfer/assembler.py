"""Receiving side of a KV transfer: gathers chunks until each block run has every layer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from deepserve.errors import InvalidArgument
from deepserve.flowserve.engine.kv_handoff import KVSink
from deepserve.flowserve.transfer.chunks import BLOCK_DIM, LAYER_DIM, KVChunk
from deepserve.flowserve.transfer.landing import KVLanding, KVRoom, LandingPool


@dataclass(slots=True)
class _Partial:
    layers: dict[int, torch.Tensor] = field(default_factory=dict)
    total_layers: int = 0


class KVAssembler:
    """Gathers received chunks into complete (all-layer) block runs and writes them at flush.

    Layer-by-layer chunks of one block run are stacked once its last layer arrives. Complete
    runs are buffered in host memory and written by `flush` as one tensor per contiguous
    range: each sink write waits for the engine thread between two steps, so one write per
    transfer instead of one per chunk keeps the hand-off from queueing behind decode steps.

    Chunks whose bytes come off a socket are not handed over as tensors: `room` gives the
    place to read them into, in one landing tensor for the whole transfer (from `landing_pool`),
    and `landed` says they are in; flush writes views of it (no concatenation), and `release`
    gives its buffer back once the transfer is over.
    """

    def __init__(
        self,
        sink: KVSink,
        first_expected_block: int,
        end_block: int,
        landing_pool: LandingPool | None = None,
    ) -> None:
        self._sink = sink
        self._start = first_expected_block
        self._end = end_block
        self._landing_pool = landing_pool
        self._landing: KVLanding | None = None
        self._partial: dict[tuple[int, int], _Partial] = {}
        self._ready: list[tuple[int, torch.Tensor]] = []
        self._done: set[int] = set()
        self.bytes_received = 0

    @property
    def complete(self) -> bool:
        """Every expected block written, nothing buffered."""
        return not self._partial and not self._ready and len(self._done) == self._end - self._start

    @property
    def missing_blocks(self) -> list[int]:
        return [b for b in range(self._start, self._end) if b not in self._done]

    def _check_blocks(self, first_block: int, num_blocks: int) -> None:
        if first_block < self._start or first_block + num_blocks > self._end:
            raise InvalidArgument(
                f"KV chunk for blocks [{first_block}, {first_block + num_blocks}) "
                f"outside the expected [{self._start}, {self._end})",
                field="first_block",
            )

    def room(
        self,
        first_block: int,
        layer_start: int,
        total_layers: int,
        dtype: torch.dtype,
        shape: Sequence[int],
    ) -> KVRoom:
        """Where the bytes of a chunk of `shape` go (its slice of the landing tensor, made on
        the first call from this chunk's dtype and shape, for every expected block)."""
        if len(shape) <= BLOCK_DIM:
            raise InvalidArgument(f"KV chunk of shape {list(shape)}", field="shape")
        self._check_blocks(first_block, int(shape[BLOCK_DIM]))
        if self._landing is None:
            full = list(shape)
            full[LAYER_DIM], full[BLOCK_DIM] = total_layers, self._end - self._start
            self._landing = KVLanding(self._landing_pool, dtype, full, self._start)
        elif total_layers != self._landing.total_layers:
            raise InvalidArgument(
                f"KV chunk of {total_layers} layers in a transfer of {self._landing.total_layers}",
                field="total_layers",
            )
        return self._landing.room(first_block, layer_start, dtype, shape)

    def landed(self, room: KVRoom) -> None:
        """The bytes of a chunk given `room` are in place."""
        assert self._landing is not None
        self._landing.landed(room)
        self.bytes_received += room.nbytes

    def release(self) -> None:
        """The transfer is over and nothing reads into its landing tensor any more: its buffer
        serves the next one. (After a failure, skip this: a read may still be in flight.)"""
        landing, self._landing = self._landing, None
        if landing is not None:
            landing.release()

    async def add(self, chunk: KVChunk) -> None:
        num_blocks = chunk.num_blocks
        self._check_blocks(chunk.first_block, num_blocks)
        self.bytes_received += chunk.nbytes
        if chunk.layer_start == 0 and chunk.num_layers == chunk.total_layers:
            await self._write(chunk.first_block, chunk.tensor)
            return
        key = (chunk.first_block, num_blocks)
        partial = self._partial.setdefault(key, _Partial(total_layers=chunk.total_layers))
        for offset in range(chunk.num_layers):
            partial.layers[chunk.layer_start + offset] = chunk.tensor.narrow(LAYER_DIM, offset, 1)
        if len(partial.layers) == partial.total_layers:
            del self._partial[key]
            tensor = torch.cat([partial.layers[i] for i in range(partial.total_layers)], LAYER_DIM)
            await self._write(chunk.first_block, tensor)

    async def flush(self) -> None:
        """Write every complete block run, merging neighbours into one write."""
        if self._landing is not None:
            for first_block, num_blocks in self._landing.take_complete_runs():
                await self._sink.write(first_block, self._landing.blocks(first_block, num_blocks))
                self._done.update(range(first_block, first_block + num_blocks))
        ready, self._ready = sorted(self._ready, key=lambda item: item[0]), []
        groups: list[tuple[int, list[torch.Tensor]]] = []
        for first_block, tensor in ready:
            if groups and groups[-1][0] + sum(t.shape[BLOCK_DIM] for t in groups[-1][1]) == (
                first_block
            ):
                groups[-1][1].append(tensor)
            else:
                groups.append((first_block, [tensor]))
        for first_block, tensors in groups:
            merged = tensors[0] if len(tensors) == 1 else torch.cat(tensors, BLOCK_DIM)
            await self._sink.write(first_block, merged)
            self._done.update(range(first_block, first_block + int(merged.shape[BLOCK_DIM])))

    async def _write(self, first_block: int, tensor: torch.Tensor) -> None:
        self._ready.append((first_block, tensor))
