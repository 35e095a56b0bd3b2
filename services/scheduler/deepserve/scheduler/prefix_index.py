"""The global prefix index: which instance holds which KV block, fed by the instances' KV events.

Engines hash every full KV block as a chain (a block's hash covers its tokens and its parent's
hash), and publish "stored"/"removed" events per tier. The scheduler receives the same chain for
a request's prompt, so "how long a prefix does instance X hold" is: how many leading hashes of
the request X holds. One index serves every TE group; a lookup is restricted to the group's
candidates. Host-tier blocks count as held: fetching them back beats recomputing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

from deepserve.store.redis_messages import KVEventEntry

TIERS = ("device", "host")


class PrefixIndex:
    """block hash (hex) -> instances holding it, per tier."""

    def __init__(self) -> None:
        self._holders: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        self._held: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        self.events_applied = 0

    def __len__(self) -> int:
        return len(self._holders)

    def blocks_of(self, instance_id: str) -> int:
        return (
            len(set().union(*self._held[instance_id].values())) if instance_id in self._held else 0
        )

    def apply(self, instance_id: str, event: KVEventEntry) -> None:
        """Applies one KV event as the instance's pod published it."""
        if event.kind == "stored":
            self.store(instance_id, event.hashes, event.tier)
        else:
            self.remove(instance_id, event.hashes, event.tier)
        self.events_applied += 1

    def store(self, instance_id: str, hashes: Iterable[str], tier: str = "device") -> None:
        held = self._held[instance_id][tier]
        for h in hashes:
            self._holders[h][instance_id].add(tier)
            held.add(h)

    def remove(self, instance_id: str, hashes: Iterable[str], tier: str = "device") -> None:
        held = self._held[instance_id][tier]
        for h in hashes:
            held.discard(h)
            tiers = self._holders.get(h, {}).get(instance_id)
            if tiers is None:
                continue
            tiers.discard(tier)
            if not tiers:
                del self._holders[h][instance_id]
                if not self._holders[h]:
                    del self._holders[h]

    def drop_instance(self, instance_id: str) -> None:
        """Forgets an instance (it died or unloaded: its cache is gone with it)."""
        for tier, hashes in self._held.pop(instance_id, {}).items():
            for h in hashes:
                holders = self._holders.get(h)
                if holders is None:
                    continue
                tiers = holders.get(instance_id)
                if tiers is not None:
                    tiers.discard(tier)
                    if not tiers:
                        del holders[instance_id]
                if not holders:
                    del self._holders[h]

    def match(self, block_hashes: Sequence[str], candidates: Iterable[str]) -> dict[str, int]:
        """Leading blocks of `block_hashes` each candidate holds (0 for none)."""
        matched = dict.fromkeys(candidates, 0)
        alive = set(matched)
        for depth, h in enumerate(block_hashes, start=1):
            holders = self._holders.get(h)
            if not holders:
                break
            alive &= holders.keys()
            if not alive:
                break
            for instance_id in alive:
                matched[instance_id] = depth
        return matched
