"""The Redis store: hot, high-rate state that may be lost without harming correctness.

Holds per-instance load reports, the KV-event streams feeding the scheduler's global prefix
index, rate-limit and usage counters. The connection pool *blocks* when all connections are busy
(up to `pool_timeout_s`), so a fan-out of many coroutines queues instead of failing.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import redis.asyncio as aioredis

from deepserve.errors import Unavailable

LOAD_KEY = "deepserve:load:{instance_id}"
KV_EVENTS_STREAM = "deepserve:kv-events:{instance_id}"


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

    async def publish_load(self, instance_id: str, load: dict[str, Any], ttl_s: float) -> None:
        """Stores an instance's latest load report; it expires if the instance stops reporting."""
        await self.client.set(
            LOAD_KEY.format(instance_id=instance_id),
            json.dumps(load),
            px=int(ttl_s * 1000),
        )

    async def read_loads(self, instance_ids: list[str]) -> dict[str, dict[str, Any]]:
        if not instance_ids:
            return {}
        values = await self.client.mget([LOAD_KEY.format(instance_id=i) for i in instance_ids])
        return {
            i: json.loads(v) for i, v in zip(instance_ids, values, strict=True) if v is not None
        }

    # --- KV events (block hashes stored / evicted), consumed by the global prefix index ----

    async def append_kv_events(
        self, instance_id: str, events: list[dict[str, Any]], maxlen: int = 100_000
    ) -> None:
        if not events:
            return
        stream = KV_EVENTS_STREAM.format(instance_id=instance_id)
        async with self.client.pipeline(transaction=False) as pipe:
            for event in events:
                pipe.xadd(stream, {"e": json.dumps(event)}, maxlen=maxlen, approximate=True)
            await pipe.execute()

    async def read_kv_events(
        self,
        instance_id: str,
        after_id: str = "0-0",
        count: int = 1000,
        block_ms: int | None = None,
    ) -> list[tuple[str, dict[str, Any]]]:
        stream = KV_EVENTS_STREAM.format(instance_id=instance_id)
        reply = await self.client.xread({stream: after_id}, count=count, block=block_ms)
        out: list[tuple[str, dict[str, Any]]] = []
        for _name, entries in reply or []:
            for entry_id, fields in entries:
                eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                out.append((eid, json.loads(fields[b"e"])))
        return out
