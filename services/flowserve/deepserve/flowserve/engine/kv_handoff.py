"""The contract between an engine and a KV hand-off: what a decode instance reserves for a
prompt whose KV another instance computes, and the two callbacks that fill it.

Kept free of gRPC and of the transfer backends, so the engine depends on nothing but this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True, slots=True)
class KVReservation:
    """Blocks a decode instance set aside for a prompt whose KV a prefill instance computes."""

    request_id: str
    # Every block of the prompt, in order (the last one may be partly filled).
    block_ids: list[int]
    # Leading blocks whose KV this instance already holds (prefix cache): not sent again.
    num_held_blocks: int
    num_prompt_tokens: int
    block_size: int

    @property
    def num_missing_blocks(self) -> int:
        return len(self.block_ids) - self.num_held_blocks


@dataclass(frozen=True, slots=True)
class PrefillResult:
    """What the prefill instance reports once every missing block has been written."""

    first_token_id: int
    # Prompt tokens the prefill instance served from its own prefix cache (usage accounting).
    num_cached_tokens: int = 0


class KVSink(Protocol):
    """Writes received KV into a reservation's blocks."""

    async def write(self, first_block: int, tensor: torch.Tensor) -> None:
        """Store `tensor` (the executor's host layout, every layer, block axis 2) into the
        reservation's blocks first_block, first_block + 1, ... (indices into block_ids).
        Copy it before returning: its memory (a view of a reused landing buffer) may be
        written by the next transfer once this returns."""
        ...


class RemotePrefillSource(Protocol):
    """Gets a prompt prefilled elsewhere: fills the missing blocks through `sink`."""

    async def prefill(self, reservation: KVReservation, sink: KVSink) -> PrefillResult: ...
