"""Host-DRAM tier of the KV cache: block payloads evicted from the device, kept LRU by hash.

The payload is whatever the executor's `copy_to_host` returns for one block (tensors on the
host); this module never looks inside it, so it stays free of torch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

from deepserve.flowserve.kv_cache.events import KVEvent, KVEventListener
from deepserve.prefix_hash import BlockHash


class HostTransport(Protocol):
    """Moves block contents between device and host (runner.host_transport implements it)."""

    def copy_to_host(self, block_ids: list[int]) -> Sequence[Any]: ...

    def load_from_host(self, block_ids: list[int], payloads: Sequence[Any]) -> None: ...


class HostEntry:
    """One block's KV saved in host memory; `payload` is None until the device copy has run."""

    __slots__ = ("block_hash", "payload")

    def __init__(self, block_hash: BlockHash) -> None:
        self.block_hash = block_hash
        self.payload: Any = None


class HostTier:
    """Fixed-capacity LRU map from block hash to host-resident KV payload."""

    def __init__(
        self, capacity_blocks: int, *, event_listener: KVEventListener | None = None
    ) -> None:
        if capacity_blocks < 0:
            raise ValueError("capacity_blocks must be >= 0")
        self.capacity_blocks = capacity_blocks
        self._entries: OrderedDict[BlockHash, HostEntry] = OrderedDict()
        self._listener = event_listener

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, block_hash: BlockHash) -> bool:
        return block_hash in self._entries

    def lookup(self, block_hash: BlockHash) -> HostEntry | None:
        """The entry for a hash, marked most recently used; None when not held."""
        entry = self._entries.get(block_hash)
        if entry is not None:
            self._entries.move_to_end(block_hash)
        return entry

    def reserve(self, block_hashes: Sequence[BlockHash]) -> list[HostEntry]:
        """Add (empty) entries for hashes not held yet, dropping least recently used ones to fit."""
        if self.capacity_blocks == 0:
            return []
        added: list[HostEntry] = []
        for block_hash in block_hashes:
            if block_hash in self._entries:
                continue
            entry = HostEntry(block_hash)
            self._entries[block_hash] = entry
            added.append(entry)
        dropped: list[BlockHash] = []
        while len(self._entries) > self.capacity_blocks:
            old_hash, _ = self._entries.popitem(last=False)
            dropped.append(old_hash)
        # An entry reserved and dropped within this call was never really held: no events.
        added_hashes = {e.block_hash for e in added}
        kept = [e for e in added if e.block_hash in self._entries]
        removed = tuple(h for h in dropped if h not in added_hashes)
        if removed:
            self._emit(KVEvent("removed", "host", removed))
        if kept:
            self._emit(KVEvent("stored", "host", tuple(e.block_hash for e in kept)))
        return kept

    def _emit(self, event: KVEvent) -> None:
        if self._listener is not None:
            self._listener(event)
