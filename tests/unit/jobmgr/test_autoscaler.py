"""The autoscaler: its policy as a pure function, and its loop over a real etcd and Redis."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from deepserve.jobmgr.autoscaler import (
    Decision,
    GroupLoad,
    ScalerMemory,
    Signals,
    applied,
    decide,
)
from deepserve.jobmgr.autoscaler_loop import Autoscaler
from deepserve.jobs.records import AutoscalingPolicy, ServingMode, ServingSpec
from deepserve.jobs.store import JobStore
from deepserve.records import InstanceRecord, Role
from deepserve.scaling.demand import DemandRecord, demands, waiting_for
from deepserve.scaling.latency import record_latency
from deepserve.store.etcd import EtcdStore
from deepserve.store.keys import Keys
from deepserve.store.redis_keys import RedisKeys
from deepserve.store.redis_messages import LoadReport
from deepserve.store.redis_store import RedisStore

C, P, D = Role.COLOCATED, Role.PREFILL, Role.DECODE


def spec(replicas: int = 1, **policy: object) -> ServingSpec:
    fields: dict[str, object] = {"enabled": True, "scale_up_cooldown_s": 5.0,
                                 "scale_down_cooldown_s": 30.0, **policy}  # fmt: skip
    return ServingSpec(
        model="m",
        replicas=replicas,
        min_replicas=0,
        max_replicas=8,
        autoscaling=AutoscalingPolicy(**fields),  # type: ignore[arg-type]
    )


def load(now: float = 100.0, **groups: GroupLoad) -> Signals:
    return Signals(now=now, groups={Role(k): v for k, v in groups.items()})


# --- policy ----------------------------------------------------------------------------------


def test_disabled_policy_never_decides() -> None:
    off = spec(enabled=False)
    busy = load(colocated=GroupLoad(instances=1, requests=100))
    assert decide(off, 1, busy, ScalerMemory()) is None


def test_queue_depth_scales_up_to_target_per_instance_within_max() -> None:
    s = spec(target_requests_per_instance=4)
    assert decide(s, 1, load(colocated=GroupLoad(1, requests=9)), ScalerMemory()) == Decision(
        3, "scale up: colocated: 9 requests"
    )
    assert decide(s, 1, load(colocated=GroupLoad(1, requests=400)), ScalerMemory()).replicas == 8


def test_full_kv_cache_and_slo_misses_each_add_an_instance() -> None:
    s = spec(target_kv_usage=0.8)
    kv = decide(s, 2, load(colocated=GroupLoad(2, requests=1, kv_usage=0.9)), ScalerMemory())
    assert kv is not None and kv.replicas == 3 and "KV 90%" in kv.reason
    slow = Signals(now=100, groups={C: GroupLoad(2, requests=1)}, ttft_miss=0.5)
    missed = decide(s, 2, slow, ScalerMemory())
    assert missed is not None and missed.replicas == 3 and "SLO" in missed.reason
    tolerated = Signals(now=100, groups={C: GroupLoad(2, requests=1)}, ttft_miss=0.05)
    settled = ScalerMemory(replicas_seen=2)  # at 2 replicas since long before
    assert decide(s, 2, tolerated, settled).replicas == 1  # load alone: one is enough


def test_a_count_the_autoscaler_did_not_set_restarts_the_down_cooldown() -> None:
    s = spec(scale_down_cooldown_s=30)
    memory = ScalerMemory()
    quiet = GroupLoad(2, requests=1)
    # First sight of the deployment (new, or a new leader): no scale-down for one cooldown.
    assert decide(s, 2, load(now=100.0, colocated=quiet), memory) is None
    # An operator scales 2 -> 6: held for a cooldown from then, not undone at once.
    assert decide(s, 6, load(now=125.0, colocated=quiet), memory) is None
    assert decide(s, 6, load(now=150.0, colocated=quiet), memory) is None
    down = decide(s, 6, load(now=156.0, colocated=quiet), memory)
    assert down == Decision(1, "scale down: colocated: 1 requests")


def test_cooldowns_hold_back_repeated_ups_and_early_downs() -> None:
    s = spec(scale_up_cooldown_s=10, scale_down_cooldown_s=30)
    memory = ScalerMemory()
    applied(memory, 1, 2, now=100.0)
    busy = load(now=105.0, colocated=GroupLoad(2, requests=40))
    assert decide(s, 2, busy, memory) is None  # within the up cooldown
    assert decide(s, 2, load(now=111.0, colocated=GroupLoad(2, requests=40)), memory) is not None
    quiet = load(now=120.0, colocated=GroupLoad(2, requests=1))
    assert decide(s, 2, quiet, memory) is None  # within the down cooldown
    down = decide(s, 2, load(now=131.0, colocated=GroupLoad(2, requests=1)), memory)
    assert down == Decision(1, "scale down: colocated: 1 requests")


def test_scale_to_zero_after_idle_and_back_on_demand() -> None:
    s = spec(scale_to_zero_after_s=10)
    memory = ScalerMemory()
    idle = GroupLoad(1, requests=0)
    assert decide(s, 1, load(now=100.0, colocated=idle), memory) is None  # idle starts now
    assert decide(s, 1, load(now=105.0, colocated=idle), memory) is None
    recent = Signals(now=109.0, groups={C: idle}, recent_requests=1)  # a request finished
    assert decide(s, 1, recent, memory) is None
    assert decide(s, 1, load(now=115.0, colocated=idle), memory) is None  # idle again from 115
    zero = decide(s, 1, load(now=125.5, colocated=idle), memory)
    assert zero is not None and zero.replicas == 0
    assert decide(s, 0, Signals(now=130.0), memory) is None  # nobody asks
    wake = decide(s, 0, Signals(now=131.0, demand=True), memory)
    assert wake == Decision(1, "scale from zero: requests are waiting")


def test_min_replicas_block_scale_to_zero_and_set_the_from_zero_size() -> None:
    s = spec(scale_to_zero_after_s=1).model_copy(update={"min_replicas": 2})
    memory = ScalerMemory()
    idle = load(now=0.0, colocated=GroupLoad(2))
    decide(s, 2, idle, memory)
    assert decide(s, 2, load(now=100.0, colocated=GroupLoad(2)), memory) is None
    assert decide(s, 0, Signals(now=100.0, demand=True), ScalerMemory()).replicas == 2


def test_prefill_and_decode_groups_are_sized_separately_keeping_the_ratio() -> None:
    pd = spec(target_requests_per_instance=2).model_copy(
        update={"mode": ServingMode.DISAGGREGATED, "prefill_instances": 1, "decode_instances": 2}
    )
    # Decode needs 5 instances (10 requests / 2) = 3 replicas of (1 prefill + 2 decode).
    signals = Signals(now=100, groups={P: GroupLoad(1, requests=1), D: GroupLoad(2, requests=10)})
    decision = decide(pd, 1, signals, ScalerMemory())
    assert (
        decision is not None
        and decision.replicas == 3
        and decision.reason.startswith("scale up: decode")
    )
    # TPOT misses grow the decode group, TTFT misses the prefill group.
    slow_decode = Signals(
        now=100, groups={P: GroupLoad(1, requests=1), D: GroupLoad(2, requests=1)}, tpot_miss=0.9
    )
    grown = decide(pd, 1, slow_decode, ScalerMemory())
    assert grown is not None and grown.replicas == 2 and "decode" in grown.reason


# --- loop over real etcd and Redis -------------------------------------------------------------


@pytest.fixture
async def stores(etcd_endpoint: str, redis_url: str) -> AsyncIterator[tuple[EtcdStore, RedisStore]]:
    async with EtcdStore(etcd_endpoint) as etcd, RedisStore(redis_url) as redis:
        for prefix in (Keys.jobs_prefix(), Keys.demand_prefix()):
            await etcd.delete_prefix(prefix)
        await redis.client.delete(RedisKeys.latency("auto-model"))
        yield etcd, redis
        for prefix in (Keys.jobs_prefix(), Keys.demand_prefix()):
            await etcd.delete_prefix(prefix)


async def test_loop_scales_from_zero_on_demand_and_up_on_reported_load(
    stores: tuple[EtcdStore, RedisStore],
) -> None:
    etcd, redis = stores
    jobs = JobStore(etcd)
    policy = AutoscalingPolicy(enabled=True, target_requests_per_instance=2, scale_up_cooldown_s=0)
    await jobs.create_serving(
        ServingSpec(model="auto-model", replicas=0, max_replicas=4, autoscaling=policy), "auto"
    )
    await jobs.create_serving(ServingSpec(model="auto-model", replicas=1), "fixed")
    instances: dict[str, InstanceRecord] = {}
    scaler = Autoscaler(etcd, lambda: instances, redis, interval_s=0.05)
    scaler.start()
    try:
        await scaler.demand.ready.wait()
        assert await scaler.pass_once() == []  # at zero, nobody waiting
        await demands(etcd).put(
            Keys.demand_entry("gw-test", "auto-model"), DemandRecord(model="auto-model", waiting=3)
        )
        assert await scaler.demand.wait_for(
            lambda items: any(r.model == "auto-model" for r in items.values()), 5
        )
        assert scaler.wake.is_set()  # the demand record woke the loop
        [(job_id, decision)] = await scaler.pass_once()
        assert (job_id, decision.replicas) == ("auto", 1)
        job = (await jobs.get("auto")).record
        assert job.serving is not None and job.serving.replicas == 1
        assert job.events[-1].reason == "Autoscaled"
        assert (await jobs.get("fixed")).record.serving.replicas == 1  # not autoscaled

        instances["i1"] = InstanceRecord(
            instance_id="i1", model="auto-model", role=Role.COLOCATED, address="x", pod_id="p",
            job_id="auto",
        )  # fmt: skip
        await redis.publish_load(
            "i1", LoadReport(running=3, waiting=4, kv_blocks_used=1, kv_blocks_total=10), 30
        )
        [(_, decision)] = await scaler.pass_once()
        assert decision.replicas == 4  # 7 requests / 2 per instance, capped at max 4
        assert (await jobs.get("auto")).record.serving.replicas == 4
    finally:
        await scaler.stop()


async def test_loop_counts_slo_misses_from_gateway_latency_reports(
    stores: tuple[EtcdStore, RedisStore],
) -> None:
    etcd, redis = stores
    jobs = JobStore(etcd)
    policy = AutoscalingPolicy(enabled=True, ttft_slo_ms=100, scale_up_cooldown_s=0)
    await jobs.create_serving(
        ServingSpec(model="auto-model", replicas=1, max_replicas=3, autoscaling=policy), "auto"
    )
    instances = {
        "i1": InstanceRecord(
            instance_id="i1", model="auto-model", role=Role.COLOCATED, address="x", pod_id="p",
            job_id="auto",
        )
    }  # fmt: skip
    scaler = Autoscaler(etcd, lambda: instances, redis)
    await redis.publish_load("i1", LoadReport(running=1, waiting=0), 30)
    for _ in range(5):
        await record_latency(redis.client, "auto-model", ttft_s=0.01, tpot_s=0.01)
    signals = await scaler.signals((await jobs.get("auto")).record)
    assert signals.ttft_miss == 0.0
    assert await scaler.pass_once() == []
    for _ in range(5):
        await record_latency(redis.client, "auto-model", ttft_s=0.5, tpot_s=0.01)
    signals = await scaler.signals((await jobs.get("auto")).record)
    assert signals.ttft_miss == pytest.approx(0.5)
    assert signals.now - time.time() < 1
    [(_, decision)] = await scaler.pass_once()
    assert decision.replicas == 2 and "SLO" in decision.reason


async def test_each_gateway_owns_its_demand_record(etcd: EtcdStore) -> None:
    """Two gateways hold requests for one model; one clearing its record keeps the other's."""
    records = demands(etcd)
    now = time.time()
    a, b = Keys.demand_entry("gw-a", "shared-model"), Keys.demand_entry("gw-b", "shared-model")
    assert Keys.demand(a) != Keys.demand(b)
    await records.put(a, DemandRecord(model="shared-model", waiting=2, at=now, source="gw-a"))
    await records.put(b, DemandRecord(model="shared-model", waiting=1, at=now, source="gw-b"))
    found = [v.record for v in (await records.list())[0]]
    assert waiting_for(found, "shared-model", now, ttl_s=30) == 3
    await records.delete(a)  # gateway A's last held request left
    found = [v.record for v in (await records.list())[0]]
    assert waiting_for(found, "shared-model", now, ttl_s=30) == 1
    assert waiting_for(found, "shared-model", now + 60, ttl_s=30) == 0  # stale counts nothing
    await records.delete(b)
