"""The Redis store: hot, high-rate state that may be lost without harming correctness.

Holds per-instance load reports, the KV-event streams feeding the scheduler's global prefix
index, rate-limit and usage counters; keys come from `redis_keys`, values are the typed messages
of `redis_messages`. The connection pool *blocks* when all connections are busy (up to
`pool_timeout_s`), so a fan-out of many coroutines queues instead of failing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis

from deepserve.errors import Unavailable
from deepserve.store.redis_keys import RedisKeys
from deepserve.store.redis_messages import BadMessage, KVEventEntry, LoadReport, SuspectInstance

log = logging.getLogger(__name__)


class RedisStore:
    """One process's Redis access; share the instance (it owns the pool)."""

    def __init__(
        self,
        url: str,
        *,
        max_connections: int = 64,
        pool_timeout_s: float = 10.0,
        socket_timeout_s: float = 30.0,
    ) -> None:
        self.url = url
        self.pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=pool_timeout_s,
            socket_timeout=socket_timeout_s,
        )
        self.client: aioredis.Redis = aioredis.Redis(connection_pool=self.pool)

    async def connect(self, wait_s: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + wait_s
        while True:
            try:
                await self.client.ping()
                return
            except Exception as exc:
                if asyncio.get_running_loop().time() > deadline:
                    raise Unavailable(f"redis at {self.url} is unreachable: {exc}") from exc
                await asyncio.sleep(0.2)

    async def close(self) -> None:
        await self.client.aclose()
        await self.pool.disconnect()

    async def __aenter__(self) -> RedisStore:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- instance load ---------------------------------------------------------------------

    async def publish_load(self, instance_id: str, report: LoadReport, ttl_s: float) -> None:
        """Stores an instance's latest load report; it expires if the instance stops reporting."""
        await self.client.set(RedisKeys.load(instance_id), report.encode(), px=int(ttl_s * 1000))

    async def read_loads(self, instance_ids: Sequence[str]) -> dict[str, LoadReport]:
        """The latest report of each instance that has one; a malformed one is logged, skipped."""
        if not instance_ids:
            return {}
        values = await self.client.mget([RedisKeys.load(i) for i in instance_ids])
        reports: dict[str, LoadReport] = {}
        for instance_id, value in zip(instance_ids, values, strict=True):
            if value is None:
                continue
            try:
                reports[instance_id] = LoadReport.decode(value)
            except BadMessage as exc:
                log.warning("bad load report from %s: %s", instance_id, exc)
        return reports

    # --- suspect instances (seen failing), shared by scheduler replicas --------------------

    async def mark_suspect(self, instance_id: str, suspect: SuspectInstance, ttl_s: float) -> None:
        """Records that an instance was seen failing; the mark expires after `ttl_s`."""
        await self.client.set(
            RedisKeys.suspect(instance_id), suspect.encode(), px=int(ttl_s * 1000)
        )

    async def read_suspects(self, instance_ids: Sequence[str]) -> dict[str, SuspectInstance]:
        """The marks of those instances that have one; a malformed one is logged, skipped."""
        if not instance_ids:
            return {}
        values = await self.client.mget([RedisKeys.suspect(i) for i in instance_ids])
        found: dict[str, SuspectInstance] = {}
        for instance_id, value in zip(instance_ids, values, strict=True):
            if value is None:
                continue
            try:
                found[instance_id] = SuspectInstance.decode(value)
            except BadMessage as exc:
                log.warning("bad suspect mark of %s: %s", instance_id, exc)
        return found

    # --- KV events (block hashes stored / evicted), consumed by the global prefix index ----

    async def append_kv_events(
        self, instance_id: str, events: Sequence[KVEventEntry], maxlen: int = 100_000
    ) -> None:
        if not events:
            return
        stream = RedisKeys.kv_events(instance_id)
        async with self.client.pipeline(transaction=False) as pipe:
            for event in events:
                pipe.xadd(stream, event.encode(), maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
            await pipe.execute()

    async def read_kv_events(
        self,
        instance_id: str,
        after_id: str = "0-0",
        count: int = 1000,
        block_ms: int | None = None,
    ) -> list[KVStreamEntry]:
        """One instance's events after `after_id` (see `read_kv_streams`)."""
        return await self.read_kv_streams({instance_id: after_id}, count=count, block_ms=block_ms)

    async def read_kv_streams(
        self,
        cursors: Mapping[str, str],
        count: int = 1000,
        block_ms: int | None = None,
    ) -> list[KVStreamEntry]:
        """What is new on the streams of `cursors` (instance id -> last entry id read), in one
        XREAD. A malformed entry is logged and comes back with no event, so a reader still
        moves its cursor past it."""
        if not cursors:
            return []
        streams = {RedisKeys.kv_events(i): after for i, after in cursors.items()}
        reply = cast(
            "list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None",
            await self.client.xread(streams, count=count, block=block_ms),  # type: ignore[arg-type]
        )
        out: list[KVStreamEntry] = []
        for name, entries in reply or []:
            instance_id = RedisKeys.kv_events_instance(_text(name))
            for entry_id, fields in entries:
                event: KVEventEntry | None
                try:
                    event = KVEventEntry.decode(fields)
                except BadMessage as exc:
                    log.warning("bad KV event from %s: %s", instance_id, exc)
                    event = None
                out.append(KVStreamEntry(instance_id, _text(entry_id), event))
        return out


@dataclass(frozen=True, slots=True)
class KVStreamEntry:
    """One entry read from an instance's KV-event stream (`event` is None when malformed)."""

    instance_id: str
    entry_id: str
    event: KVEventEntry | None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
