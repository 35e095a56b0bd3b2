"""RedisStore against a real Redis-protocol server: load reports, KV event streams, pool waits."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from deepserve.store.redis_keys import RedisKeys
from deepserve.store.redis_messages import KVEventEntry, LoadReport
from deepserve.store.redis_store import RedisStore

pytestmark = pytest.mark.integration


async def test_load_reports_expire(redis_url: str) -> None:
    async with RedisStore(redis_url) as store:
        iid = uuid.uuid4().hex
        report = LoadReport(at=1.5, model="m", running=3, waiting=1)
        await store.publish_load(iid, report, ttl_s=1.0)  # outlives the read on a loaded host
        assert (await store.read_loads([iid, "absent"])) == {iid: report}
        await asyncio.sleep(1.3)
        assert await store.read_loads([iid]) == {}


async def test_kv_events_stream_in_order(redis_url: str) -> None:
    async with RedisStore(redis_url) as store:
        iid = uuid.uuid4().hex
        await store.append_kv_events(
            iid, [KVEventEntry("stored", "device", (f"h{i}",)) for i in range(5)]
        )
        first = await store.read_kv_events(iid, count=3)
        assert [e.event.hashes[0] for e in first if e.event] == ["h0", "h1", "h2"]
        assert {e.instance_id for e in first} == {iid}
        rest = await store.read_kv_events(iid, after_id=first[-1].entry_id)
        assert [e.event.hashes[0] for e in rest if e.event] == ["h3", "h4"]


async def test_malformed_entries_are_skipped_not_fatal(redis_url: str) -> None:
    async with RedisStore(redis_url) as store:
        iid = uuid.uuid4().hex
        await store.client.set(RedisKeys.load(iid), "not json")
        assert await store.read_loads([iid]) == {}
        await store.client.xadd(RedisKeys.kv_events(iid), {"e": '{"kind": "weird"}'})
        await store.append_kv_events(iid, [KVEventEntry("removed", "host", ("h9",))])
        bad, good = await store.read_kv_streams({iid: "0-0"})
        assert bad.event is None and bad.entry_id  # a reader's cursor still moves past it
        assert (await store.read_kv_streams({iid: bad.entry_id})) == [good]
        assert good.event == KVEventEntry("removed", "host", ("h9",))


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
