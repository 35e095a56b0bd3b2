"""Keeps the global prefix index in step with every live instance's KV-event stream in Redis.

Each instance appends its KV events to its own stream; this loop reads all of them (one
blocking XREAD over every live instance's stream, from where it left off), applies them to the
index, and forgets an instance's blocks the moment it leaves the instance table. Every
scheduler replica reads the same streams from the start, so every replica builds the same index.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from deepserve.background import stop_task
from deepserve.scheduler.prefix_index import PrefixIndex
from deepserve.store.redis_store import RedisStore

log = logging.getLogger(__name__)


class KVEventFeed:
    """Tails the KV-event streams of the instances `live_ids()` returns into `index`."""

    def __init__(
        self,
        redis: RedisStore,
        index: PrefixIndex,
        live_ids: Callable[[], list[str]],
        *,
        block_ms: int = 100,
        batch: int = 5000,
    ) -> None:
        self._redis = redis
        self.index = index
        self._live_ids = live_ids
        self._block_ms = block_ms
        self._batch = batch
        self._cursors: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="kv-event-feed")

    async def stop(self) -> None:
        await stop_task(self._task)

    def sync_instances(self) -> list[str]:
        """Starts cursors for new instances, drops gone ones; returns the live ids."""
        live = self._live_ids()
        live_set = set(live)
        for instance_id in list(self._cursors):
            if instance_id not in live_set:
                del self._cursors[instance_id]
                self.index.drop_instance(instance_id)
        for instance_id in live:
            self._cursors.setdefault(instance_id, "0-0")
        return live

    async def poll_once(self, block_ms: int | None = None) -> int:
        """Reads and applies what is new on every live stream; returns the events applied."""
        live = self.sync_instances()
        if not live:
            if block_ms:
                await asyncio.sleep(block_ms / 1000)
            return 0
        entries = await self._redis.read_kv_streams(
            {i: self._cursors[i] for i in live}, count=self._batch, block_ms=block_ms
        )
        applied = 0
        for entry in entries:
            if entry.instance_id not in self._cursors:
                continue  # left while we were reading
            if entry.event is not None:  # a malformed one was logged by the store
                self.index.apply(entry.instance_id, entry.event)
                applied += 1
            self._cursors[entry.instance_id] = entry.entry_id
        return applied

    async def _run(self) -> None:
        while True:
            try:
                await self.poll_once(self._block_ms)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis is lossy-tolerable: routing degrades, never fails
                log.warning("reading KV events failed: %s", exc)
                await asyncio.sleep(0.5)
