"""KV cache events: which block hashes a tier now holds or has dropped.

The service forwards these to Redis, where the global scheduler keeps one prefix index per
TE group (the paper's locality-aware routing). Losing events only degrades routing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from deepserve.prefix_hash import BlockHash

KVTier = Literal["device", "host"]
KVEventKind = Literal["stored", "removed"]


@dataclass(frozen=True, slots=True)
class KVEvent:
    """Blocks with these hashes became matchable (stored) or stopped being so (removed) in a tier."""

    kind: KVEventKind
    tier: KVTier
    block_hashes: tuple[BlockHash, ...]

    @property
    def hex_hashes(self) -> list[str]:
        return [h.hex() for h in self.block_hashes]


class KVEventListener(Protocol):
    """Receives KV events synchronously on the engine thread; must be quick and never raise."""

    def __call__(self, event: KVEvent) -> None: ...


class KVEventRecorder:
    """A listener that keeps every event, and the set of hashes currently held per tier."""

    def __init__(self) -> None:
        self.events: list[KVEvent] = []
        self.held: dict[KVTier, set[BlockHash]] = {"device": set(), "host": set()}

    def __call__(self, event: KVEvent) -> None:
        self.events.append(event)
        held = self.held[event.tier]
        if event.kind == "stored":
            held.update(event.block_hashes)
        else:
            held.difference_update(event.block_hashes)
