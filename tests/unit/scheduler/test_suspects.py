"""Instances reported failing: avoided at once by the replica told, by the others through a
real Redis-protocol server within a refresh, and routed to again when their load reports go on."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from deepserve.scheduler.load_tracker import LoadTracker
from deepserve.scheduler.router import RouteFacts
from deepserve.scheduler.suspects import SuspectConfig, SuspectInstances
from deepserve.store.redis_messages import LoadReport
from deepserve.store.redis_store import RedisStore

from .router_fixtures import MODEL, instance, make_router


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[RedisStore]:
    async with RedisStore(redis_url) as store:
        yield store


class Clock:
    """A settable wall clock (unix seconds)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def replica(
    redis: RedisStore | None, live: list[str], loads: LoadTracker, clock: Clock, name: str
) -> SuspectInstances:
    return SuspectInstances(
        redis,
        lambda: live,
        lambda i: loads.load_of(i).report_at,
        reporter=name,
        config=SuspectConfig(clear_after_s=1.0),
        clock=clock,
    )


async def test_a_report_is_shared_and_lifted_when_load_reports_continue(
    redis: RedisStore,
) -> None:
    suffix = uuid.uuid4().hex[:6]
    a, b = f"a-{suffix}", f"b-{suffix}"
    live = [a, b]
    clock = Clock(1000.0)
    loads = LoadTracker(redis, lambda: live)
    one = replica(redis, live, loads, clock, "one")
    two = replica(redis, live, loads, clock, "two")
    await redis.publish_load(a, LoadReport(at=999.5), ttl_s=30)
    await loads.refresh()

    one.report(a, "UNAVAILABLE: Socket closed")
    assert one.suspects(live) == {a}  # at once, on the replica told
    assert two.suspects(live) == set()
    for _ in range(50):  # the mark reaches Redis in the background
        await two.refresh()
        if two.suspects(live):
            break
        await asyncio.sleep(0.02)
    assert two.suspects(live) == {a}
    assert two.marked[a].reporter == "one"

    # A report written before the failure, or just after it, proves nothing.
    await redis.publish_load(a, LoadReport(at=1000.5), ttl_s=30)
    await loads.refresh()
    assert one.suspects(live) == two.suspects(live) == {a}
    # Reports that go on past clear_after_s: it was alive after all.
    await redis.publish_load(a, LoadReport(at=1001.5), ttl_s=30)
    await loads.refresh()
    assert one.suspects(live) == two.suspects(live) == set()
    # The mark still in Redis is not taken up again.
    await two.refresh()
    assert two.suspects(live) == set()


async def test_marks_of_instances_gone_from_the_table_are_forgotten() -> None:
    live = ["a", "b"]
    loads = LoadTracker(None, lambda: live)
    suspects = replica(None, live, loads, Clock(10.0), "one")
    suspects.report("a", "stream broke")
    live.remove("a")
    await suspects.refresh()
    assert suspects.marked == {}


def test_routing_avoids_suspects_but_uses_them_when_nothing_else_is_left() -> None:
    router = make_router([instance("a"), instance("b")])
    live = ["a", "b"]
    suspects = replica(None, live, router.loads, Clock(10.0), "one")
    router.suspects = suspects
    facts = RouteFacts(request_id="r", model=MODEL, prompt_tokens=8)
    assert router.route(facts).instances[0].instance_id == "a"  # tie: the lowest id
    suspects.report("a", "stream broke")
    for _ in range(4):
        assert router.route(facts).instances[0].instance_id == "b"
    suspects.report("b", "stream broke")
    # Both suspect: routing still answers (a request tried on a suspect beats a refusal).
    assert router.route(facts).instances[0].instance_id in {"a", "b"}
