"""The Redis contract without Redis: every message round-trips its encoding, malformed values
are refused as BadMessage, and every key comes from one builder."""

from __future__ import annotations

import json

import pytest

from deepserve.store.redis_keys import RedisKeys
from deepserve.store.redis_messages import (
    AdmitRequest,
    AdmitVerdict,
    BadMessage,
    DecodeHistory,
    FinishRequest,
    KVEventEntry,
    LatencySample,
    LimitRefusal,
    LoadReport,
    RoutedSince,
    UsageCounts,
    UsageIndexEntry,
)


def as_redis_reply(mapping: dict[str, object]) -> dict[bytes, bytes]:
    """What a hash or stream entry looks like when redis-py reads it back (bytes both sides)."""
    return {k.encode(): str(v).encode() for k, v in mapping.items()}


def test_load_report_round_trips_and_tolerates_missing_and_unknown_fields() -> None:
    report = LoadReport(
        at=1712.25,
        model="org/m",
        running=3,
        waiting=2,
        kv_blocks_used=40,
        kv_blocks_total=160,
        prefix_cache_hit_rate=0.5,
        tokens_per_s=812.5,
    )
    assert LoadReport.decode(report.encode()) == report
    assert LoadReport.decode(report.encode().encode()) == report  # bytes, as MGET returns
    assert report.kv_use == 0.25
    # A newer producer may add a field; an older one may lack some: defaults fill in.
    assert LoadReport.decode(json.dumps({"running": 1, "new_field": "x"})) == LoadReport(running=1)


@pytest.mark.parametrize(
    "raw", ["not json", "[1, 2]", '{"running": "many"}', '{"at": null}', b"\xff"]
)
def test_malformed_load_reports_are_bad_messages(raw: str | bytes) -> None:
    with pytest.raises(BadMessage):
        LoadReport.decode(raw)


def test_kv_event_entry_round_trips_as_a_stream_entry() -> None:
    event = KVEventEntry("stored", "host", ("00ff", "abcd"), at=3.5)
    fields = event.encode()
    assert list(fields) == [KVEventEntry.FIELD]
    assert KVEventEntry.decode(fields) == event
    assert KVEventEntry.decode({k.encode(): v.encode() for k, v in fields.items()}) == event


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"e": "not json"},
        {"e": '{"kind": "evicted", "tier": "device", "hashes": []}'},
        {"e": '{"kind": "stored", "tier": "disk", "hashes": []}'},
        {"e": '{"kind": "stored", "tier": "device", "hashes": [1, 2]}'},
        {"e": '{"kind": "stored", "tier": "device"}'},
    ],
)
def test_malformed_kv_events_are_bad_messages(fields: dict[str, str]) -> None:
    with pytest.raises(BadMessage):
        KVEventEntry.decode(fields)


def test_routed_since_names_a_report_exactly() -> None:
    at = 1712345678.123456
    added = RoutedSince(at, 3)
    assert added.field == RoutedSince.field_for(at) == repr(at)
    assert float(added.field) == at  # every replica names the same report the same way
    assert RoutedSince.decode(at, b"3") == added
    assert RoutedSince.decode(at, None) == RoutedSince(at, 0)
    with pytest.raises(BadMessage):
        RoutedSince.decode(at, b"three")


def test_decode_history_round_trips_as_a_hash() -> None:
    history = DecodeHistory({128: 4, 1024: 1})
    assert DecodeHistory.decode(as_redis_reply(dict(history.encode()))) == history
    with pytest.raises(BadMessage):
        DecodeHistory.decode({b"long": b"1"})


def test_latency_sample_round_trips_rounded() -> None:
    sample = LatencySample(at=100.5, ttft_s=0.125, tpot_s=0.01)
    assert LatencySample.decode(sample.encode()) == sample
    assert LatencySample.decode(LatencySample(1.0, 0.123456789, 0.0).encode()).ttft_s == 0.1235
    for raw in ("{}", "[1, 2]", '["a", 1, 2]'):
        with pytest.raises(BadMessage):
            LatencySample.decode(raw)


def test_usage_counts_and_index_entries_round_trip() -> None:
    counts = UsageCounts(requests=2, prompt_tokens=11, completion_tokens=7)
    assert UsageCounts.decode(as_redis_reply(dict(counts.encode()))) == counts
    assert counts.total_tokens == 18
    assert UsageCounts.decode({}) == UsageCounts()
    entry = UsageIndexEntry("acme", "org/model:v2")
    assert UsageIndexEntry.decode(entry.encode().encode()) == entry
    with pytest.raises(BadMessage):
        UsageIndexEntry.decode(b"no-separator")


def test_rate_limit_script_arguments_and_replies() -> None:
    admit = AdmitRequest("req-1:abc", 60, 1000, 4, 300, 60_000, 600_000)
    assert admit.encode() == ["req-1:abc", 60, 1000, 4, 300, 60_000, 600_000]
    assert FinishRequest("req-1:abc", 120).encode() == ["req-1:abc", 120]
    assert AdmitVerdict.decode([0, 0]).admitted
    refused = AdmitVerdict.decode([3, 250])
    assert (refused.refusal, refused.wait_ms, refused.admitted) == (
        LimitRefusal.CONCURRENCY,
        250,
        False,
    )
    for reply in ([9, 0], [1], "OK"):
        with pytest.raises(BadMessage):
            AdmitVerdict.decode(reply)


def test_keys_share_one_root_and_tenant_keys_share_one_cluster_slot() -> None:
    keys = [
        RedisKeys.load("i1"),
        RedisKeys.kv_events("i1"),
        RedisKeys.routed("i1"),
        RedisKeys.decode_history("m", "t"),
        RedisKeys.latency("m"),
        RedisKeys.usage_index(),
        RedisKeys.usage("t", "m"),
        *RedisKeys.rate_limit("t"),
    ]
    assert all(k.startswith("deepserve:") for k in keys)
    assert len(set(keys)) == len(keys)
    assert RedisKeys.kv_events_instance(RedisKeys.kv_events("inst-7:x")) == "inst-7:x"
    with pytest.raises(ValueError):
        RedisKeys.kv_events_instance(RedisKeys.load("i1"))
    # Model names with ':' stay one segment of the history key.
    assert RedisKeys.decode_history("a:b", "") != RedisKeys.decode_history("a", "b")
    # The limiter's Lua script touches all four keys of a tenant at once: one hash tag.
    assert all("{t}" in k for k in RedisKeys.rate_limit("t"))
    assert "{t}" in RedisKeys.usage("t", "m")
