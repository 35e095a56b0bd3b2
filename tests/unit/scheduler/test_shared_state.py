"""The scheduler's mirrors of shared state in a real Redis-protocol server: loads (with routed
counts shared between replicas), the KV-event feed into the prefix index, decode histories."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from deepserve.scheduler.decode_predictor import DecodeLengthPredictor
from deepserve.scheduler.history_sync import HistorySync
from deepserve.scheduler.kv_event_feed import KVEventFeed
from deepserve.scheduler.load_tracker import LoadTracker
from deepserve.scheduler.prefix_index import PrefixIndex
from deepserve.store.redis_messages import KVEventEntry, LoadReport
from deepserve.store.redis_store import RedisStore


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[RedisStore]:
    async with RedisStore(redis_url) as store:
        yield store


def ids(*names: str) -> list[str]:
    suffix = uuid.uuid4().hex[:6]
    return [f"{n}-{suffix}" for n in names]


async def test_loads_are_read_from_reports_and_routed_counts_are_shared(
    redis: RedisStore,
) -> None:
    a, b = ids("a", "b")
    await redis.publish_load(
        a,
        LoadReport(at=100.0, running=2, waiting=3, kv_blocks_used=5, kv_blocks_total=10),
        ttl_s=30,
    )
    one = LoadTracker(redis, lambda: [a, b])
    two = LoadTracker(redis, lambda: [a, b])
    await one.refresh()
    load = one.load_of(a)
    assert (load.running, load.waiting, load.kv_use) == (2, 3, 0.5)
    assert load.score(kv_weight=4.0) == pytest.approx(7.0)
    assert one.load_of(b).score(4.0) == 0.0  # no report yet
    # Replica one routes three requests to `a`; replica two sees them after one refresh each.
    for _ in range(3):
        one.note_routed(a)
    assert one.load_of(a).routed_since_report == 3
    await one.refresh()
    await two.refresh()
    assert two.load_of(a).routed_since_report == 3
    assert one.load_of(a).routed_since_report == 3
    # A fresh report already includes those requests: the routed count starts over.
    await redis.publish_load(a, LoadReport(at=101.0, running=5, waiting=3), ttl_s=30)
    await two.refresh()
    assert two.load_of(a).routed_since_report == 0


async def test_kv_event_feed_builds_the_index_and_drops_gone_instances(
    redis: RedisStore,
) -> None:
    a, b = ids("a", "b")
    live = [a, b]
    index = PrefixIndex()
    feed = KVEventFeed(redis, index, lambda: list(live))
    await redis.append_kv_events(a, [KVEventEntry("stored", "device", ("h0", "h1", "h2"), 1.0)])
    await redis.append_kv_events(b, [KVEventEntry("stored", "device", ("h0",))])
    assert await feed.poll_once() == 2
    assert index.match(["h0", "h1", "h2"], [a, b]) == {a: 3, b: 1}
    await redis.append_kv_events(a, [KVEventEntry("removed", "device", ("h2",))])
    assert await feed.poll_once() == 1
    assert index.match(["h0", "h1", "h2"], [a]) == {a: 2}
    # A second replica reading the same streams from the start builds the same index.
    replica = PrefixIndex()
    await KVEventFeed(redis, replica, lambda: list(live)).poll_once()
    assert replica.match(["h0", "h1", "h2"], [a, b]) == index.match(["h0", "h1", "h2"], [a, b])
    live.remove(a)
    await feed.poll_once()
    assert index.match(["h0"], [a, b]) == {a: 0, b: 1}


async def test_decode_histories_are_shared_between_replicas(redis: RedisStore) -> None:
    model = f"m-{uuid.uuid4().hex[:6]}"
    first, second = DecodeLengthPredictor(), DecodeLengthPredictor()
    sync_first = HistorySync(redis, first)
    sync_second = HistorySync(redis, second)
    assert not second.predict(model, "t").from_history  # registers interest
    for _ in range(10):
        first.observe(model, "t", 700)
        sync_first.observed(model, "t", first.bucket_of(700))
    await sync_first.sync_once()
    await sync_second.sync_once()
    prediction = second.predict(model, "t")
    assert prediction.from_history
    assert prediction.bucket == second.bucket_of(700)
