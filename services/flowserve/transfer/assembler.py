"""Receiving side of a KV transfer: gathers chunks until each block run has every layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from deepserve.errors import InvalidArgument
from deepserve.flowserve.disagg.handoff import KVSink
from deepserve.flowserve.transfer.chunks import BLOCK_DIM, LAYER_DIM, KVChunk


@dataclass(slots=True)
class _Partial:
    layers: dict[int, torch.Tensor] = field(default_factory=dict)
    total_layers: int = 0


class KVAssembler:
    """Writes complete (all-layer) block runs to a sink; buffers layer-partial ones.

    Whole-request chunks carry every layer and pass straight through. Layer-by-layer chunks
    of the same block run are stacked once the last layer arrives, so the sink (and the
    device) sees one write per block run.
    """

    def __init__(self, sink: KVSink, first_expected_block: int, end_block: int) -> None:
        self._sink = sink
        self._start = first_expected_block
        self._end = end_block
        self._partial: dict[tuple[int, int], _Partial] = {}
        self._done: set[int] = set()
        self.bytes_received = 0

    @property
    def complete(self) -> bool:
        """Every expected block written, nothing buffered."""
        return not self._partial and len(self._done) == self._end - self._start

    @property
    def missing_blocks(self) -> list[int]:
        return [b for b in range(self._start, self._end) if b not in self._done]

    async def add(self, chunk: KVChunk) -> None:
        num_blocks = chunk.num_blocks
        if chunk.first_block < self._start or chunk.first_block + num_blocks > self._end:
            raise InvalidArgument(
                f"KV chunk for blocks [{chunk.first_block}, {chunk.first_block + num_blocks}) "
                f"outside the expected [{self._start}, {self._end})",
                field="first_block",
            )
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

    async def _write(self, first_block: int, tensor: torch.Tensor) -> None:
        await self._sink.write(first_block, tensor)
        self._done.update(range(first_block, first_block + int(tensor.shape[BLOCK_DIM])))
