"""RedisStore against a real Redis-protocol server: load reports, KV event streams, pool waits."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from deepserve.store.redis_store import RedisStore

pytestmark = pytest.mark.integration


async def test_load_reports_expire(redis_url: str) -> None:
    async with RedisStore(redis_url) as store:
        iid = uuid.uuid4().hex
        await store.publish_load(iid, {"running": 3, "waiting": 1}, ttl_s=0.3)
        assert (await store.read_loads([iid, "absent"])) == {iid: {"running": 3, "waiting": 1}}
        await asyncio.sleep(0.5)
        assert await store.read_loads([iid]) == {}


async def test_kv_events_stream_in_order(redis_url: str) -> None:
    async with RedisStore(redis_url) as store:
        iid = uuid.uuid4().hex
        await store.append_kv_events(iid, [{"stored": [f"h{i}"]} for i in range(5)])
        first = await store.read_kv_events(iid, count=3)
        assert [e["stored"][0] for _, e in first] == ["h0", "h1", "h2"]
        rest = await store.read_kv_events(iid, after_id=first[-1][0])
        assert [e["stored"][0] for _, e in rest] == ["h3", "h4"]


async def test_fan_out_beyond_pool_size_waits_instead_of_failing(redis_url: str) -> None:
    # 200 concurrent callers share 4 connections: all must succeed.
    async with RedisStore(redis_url, max_connections=4) as store:
        key = f"fanout:{uuid.uuid4().hex}"

        async def slow_incr() -> None:
            # BLPOP on an empty list holds the connection for a moment, forcing others to queue.
            await store.client.blpop([f"{key}:never"], timeout=0.01)
            await store.client.incr(key)

        await asyncio.gather(*(slow_incr() for _ in range(200)))
        assert int(await store.client.get(key)) == 200
