"""Leader election through etcd: of several replicas exactly one leads at a time.

Each candidate writes a key under /deepserve/election/<name>/ attached to its own lease; the
candidate whose key has the lowest create revision leads. A candidate that dies stops refreshing,
its lease expires within the TTL and the next candidate takes over (etcd's election recipe).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from deepserve.store.etcd import EtcdStore, KeepAliveLease
from deepserve.store.keys import Keys

log = logging.getLogger(__name__)


class LeaderElection:
    """Campaigns for leadership of `name`; `is_leader` reflects the current state."""

    def __init__(self, store: EtcdStore, name: str, candidate_id: str, ttl_s: int) -> None:
        self._store = store
        self._prefix = Keys.election_prefix(name)
        self._key = self._prefix + candidate_id
        self.candidate_id = candidate_id
        self._ttl_s = ttl_s
        self._lease: KeepAliveLease | None = None
        self.elected = asyncio.Event()
        self.deposed = asyncio.Event()

    @property
    def is_leader(self) -> bool:
        return self.elected.is_set() and not self.deposed.is_set()

    async def campaign(self) -> None:
        """Returns once this candidate leads. Watch `deposed` to learn of losing it."""
        self._lease = await self._store.grant_lease(self._ttl_s)
        self._lease.on_lost(self.deposed.set)
        await self._store.put(self._key, self.candidate_id.encode(), lease_id=self._lease.id)
        while True:
            kvs, revision = await self._store.list(self._prefix)
            kvs.sort(key=lambda kv: kv.create_revision)
            if kvs and kvs[0].key == self._key:
                log.info("%s leads %s", self.candidate_id, self._prefix)
                self.elected.set()
                return
            if not any(kv.key == self._key for kv in kvs):
                raise RuntimeError("election key vanished: lease lost while campaigning")
            # Wait for any change under the prefix (a predecessor leaving), then look again.
            events = self._store.watch_prefix(self._prefix, start_revision=revision + 1)
            async with contextlib.aclosing(events):
                async for _event in events:
                    break

    async def leader(self) -> str | None:
        kvs, _ = await self._store.list(self._prefix)
        if not kvs:
            return None
        return min(kvs, key=lambda kv: kv.create_revision).value.decode()

    async def resign(self) -> None:
        if self._lease is not None:
            await self._lease.revoke()
        with contextlib.suppress(Exception):
            await self._store.delete(self._key)
        self.deposed.set()
