"""The global prefix index: leading-block matches per instance, fed by KV events."""

from __future__ import annotations

from deepserve.scheduler.prefix_index import PrefixIndex
from deepserve.store.redis_messages import KVEventEntry

CHAIN = [f"h{i}" for i in range(8)]


def test_match_counts_leading_blocks_per_candidate() -> None:
    index = PrefixIndex()
    index.store("a", CHAIN[:6])
    index.store("b", CHAIN[:2])
    index.store("c", ["other"])
    assert index.match(CHAIN, ["a", "b", "c"]) == {"a": 6, "b": 2, "c": 0}


def test_match_stops_at_the_first_gap_and_only_reports_candidates() -> None:
    index = PrefixIndex()
    index.store("a", [CHAIN[0], CHAIN[1], CHAIN[3]])  # block 2 evicted: 3 is not reusable
    index.store("b", CHAIN)
    assert index.match(CHAIN, ["a"]) == {"a": 2}


def test_events_in_the_shell_format_store_and_remove_per_tier() -> None:
    index = PrefixIndex()
    index.apply("a", KVEventEntry("stored", "device", tuple(CHAIN[:4]), at=1.0))
    index.apply("a", KVEventEntry("stored", "host", tuple(CHAIN[:2])))
    index.apply("a", KVEventEntry("removed", "device", tuple(CHAIN[:4])))
    # Still held in host memory: fetching beats recomputing, so it still counts.
    assert index.match(CHAIN, ["a"]) == {"a": 2}
    index.apply("a", KVEventEntry("removed", "host", tuple(CHAIN[:2])))
    assert index.match(CHAIN, ["a"]) == {"a": 0}
    assert len(index) == 0
    assert index.events_applied == 4


def test_dropping_an_instance_forgets_only_its_blocks() -> None:
    index = PrefixIndex()
    index.store("a", CHAIN)
    index.store("b", CHAIN[:3])
    index.drop_instance("a")
    assert index.match(CHAIN, ["a", "b"]) == {"a": 0, "b": 3}
    assert len(index) == 3
    assert index.blocks_of("a") == 0
