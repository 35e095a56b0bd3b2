"""Each producer of a Redis message against each of its consumers, through a real
Redis-protocol server (the session `redis_url` fixture): what one service writes, the other
reads back as the same typed message.

    load report     flowserve pod shell  -> scheduler LoadTracker, jobmgr Autoscaler
    KV events       flowserve pod shell  -> scheduler KVEventFeed (and routing over its index)
    latency sample  gateway DemandHold   -> jobmgr Autoscaler
    usage counts    UsageMeter.record    -> UsageMeter.read (the CLI and API readers)

Routed-since counts and decode histories (scheduler replica to replica) are covered in
tests/unit/scheduler/test_shared_state.py; rate-limit counters in
tests/unit/gateway/test_tenancy.py.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from deepserve.flowserve.engine.stats import EngineStats
from deepserve.flowserve.kv_cache.events import KVEvent
from deepserve.flowserve.kv_cache.manager import PinnedContext
from deepserve.flowserve.pod.shell import TaskExecutorShell
from deepserve.flowserve.settings import FlowServeSettings
from deepserve.gateway.demand import DemandHold
from deepserve.gateway.model_directory import ModelDirectory
from deepserve.jobmgr.autoscaler_loop import Autoscaler
from deepserve.jobs.records import AutoscalingPolicy, JobKind, JobRecord, ServingSpec
from deepserve.prefix_hash import extend_block_hashes, prompt_block_hashes
from deepserve.records import InstanceRecord, Role
from deepserve.scheduler.kv_event_feed import KVEventFeed
from deepserve.scheduler.load_tracker import LoadTracker
from deepserve.scheduler.router import RouteFacts
from deepserve.store.etcd import EtcdStore
from deepserve.store.redis_store import RedisStore
from deepserve.tenancy.usage import UsageMeter
from tests.unit.scheduler.router_fixtures import make_router

pytestmark = pytest.mark.timeout(60)

BLOCK = 16


@pytest.fixture
async def stores(etcd_endpoint: str, redis_url: str) -> AsyncIterator[tuple[EtcdStore, RedisStore]]:
    async with EtcdStore(etcd_endpoint) as etcd, RedisStore(redis_url) as redis:
        yield etcd, redis


class ServingEngine:
    """The part of a loaded engine the shell's reporter reads: its stats snapshot and pins."""

    def __init__(self, stats: EngineStats) -> None:
        self._stats = stats
        self.pins = [PinnedContext("ctx_live", 32, 0.0), PinnedContext("ctx_old", 16, 1.0)]

    def stats(self) -> EngineStats:
        return self._stats

    async def unpin_expired(self, now: float) -> list[str]:
        expired = [p.context_id for p in self.pins if 0 < p.expires_at <= now]
        self.pins = [p for p in self.pins if p.context_id not in expired]
        return expired

    async def pinned_contexts(self) -> list[PinnedContext]:
        return list(self.pins)

    def held_adapters(self) -> list[str]:
        return ["acme/support-bot"]


def loaded_shell(etcd: EtcdStore, redis: RedisStore, stats: EngineStats) -> TaskExecutorShell:
    """A pod shell that has loaded a model (without building a real engine)."""
    shell = TaskExecutorShell(FlowServeSettings(load_report_interval_s=1.0), etcd, redis)
    shell.engine = ServingEngine(stats)
    shell.model_name = "pairs-model"
    shell.instance_id = f"inst-{uuid.uuid4().hex[:8]}"
    return shell


def instance(instance_id: str, job_id: str = "") -> InstanceRecord:
    return InstanceRecord(
        instance_id=instance_id,
        model="pairs-model",
        role=Role.COLOCATED,
        address="x:1",
        pod_id="p",
        job_id=job_id,
        block_size=BLOCK,
    )


def serving_job(job_id: str, model: str = "pairs-model") -> JobRecord:
    policy = AutoscalingPolicy(enabled=True, ttft_slo_ms=100, scale_to_zero_after_s=60)
    return JobRecord(
        job_id=job_id,
        kind=JobKind.SERVING,
        serving=ServingSpec(model=model, replicas=1, max_replicas=4, autoscaling=policy),
    )


async def test_the_shells_load_report_is_read_by_the_scheduler_and_the_autoscaler(
    stores: tuple[EtcdStore, RedisStore],
) -> None:
    etcd, redis = stores
    stats = EngineStats(
        num_running=2,
        num_waiting=5,
        kv_blocks_used=30,
        kv_blocks_total=120,
        generation_tokens_per_s=400.0,
    )
    shell = loaded_shell(etcd, redis, stats)
    before = time.time()
    await shell.publish_state()

    tracker = LoadTracker(redis, lambda: [shell.instance_id])
    await tracker.refresh()
    load = tracker.load_of(shell.instance_id)
    assert (load.running, load.waiting, load.kv_use) == (2, 5, 0.25)
    assert load.report_at >= before
    # Pinned contexts travel with the report (the expired one was unpinned first).
    assert tracker.holders("ctx_live", [shell.instance_id]) == [shell.instance_id]
    assert tracker.holders("ctx_old", [shell.instance_id]) == []
    # So do the LoRA adapters it holds (routing's adapter affinity).
    assert tracker.adapter_holders("acme/support-bot", [shell.instance_id]) == [shell.instance_id]
    assert tracker.adapter_holders("acme/other", [shell.instance_id]) == []

    job_id = f"pairs-{uuid.uuid4().hex[:6]}"
    mine = {shell.instance_id: instance(shell.instance_id, job_id)}
    scaler = Autoscaler(etcd, lambda: mine, redis)
    signals = await scaler.signals(serving_job(job_id))
    group = signals.groups[Role.COLOCATED]
    assert (group.instances, group.requests, group.kv_usage) == (1, 7, 0.25)
    assert group.tokens_per_s == 400.0


async def test_the_engines_kv_events_reach_the_prefix_index_the_router_matches(
    stores: tuple[EtcdStore, RedisStore],
) -> None:
    etcd, redis = stores
    shell = loaded_shell(etcd, redis, EngineStats())
    prompt = list(range(3, 3 + 5 * BLOCK))
    # The engine's cache keys (bytes) for the prompt's first four blocks, as its KV cache
    # emits them on the engine thread.
    cached = extend_block_hashes([], prompt[: 4 * BLOCK], BLOCK)
    shell._on_kv_event(KVEvent("stored", "device", tuple(cached)))
    shell._on_kv_event(KVEvent("removed", "device", tuple(cached[3:])))
    await shell.publish_state()

    router = make_router([instance(shell.instance_id), instance("other")])
    feed = KVEventFeed(redis, router.index, lambda: [shell.instance_id, "other"])
    assert await feed.poll_once() == 2
    # The gateway's routing hashes of the same prompt match what the engine said it holds.
    decision = router.route(
        RouteFacts(
            "r",
            "pairs-model",
            prompt_tokens=len(prompt),
            prefix_block_hashes=prompt_block_hashes(prompt, BLOCK),
            block_size=BLOCK,
        )
    )
    assert decision.instances[0].instance_id == shell.instance_id
    assert decision.scores == {shell.instance_id: 3.0, "other": 0.0}
    assert router.index.blocks_of(shell.instance_id) == 3


@dataclass(eq=False)  # hashed by identity: the gateway keeps its marks in a WeakKeyDictionary
class FinishedCall:
    """The part of a finished ApiCall the gateway's latency report reads."""

    @dataclass
    class Job:
        model: str

    @dataclass
    class Usage:
        completion_tokens: int

    job: Job
    completion_tokens: int
    completed: bool = True

    def usage(self) -> Usage:
        return self.Usage(self.completion_tokens)


async def test_the_gateways_latency_samples_are_read_by_the_autoscaler(
    stores: tuple[EtcdStore, RedisStore],
) -> None:
    etcd, redis = stores
    model = f"pairs-{uuid.uuid4().hex[:6]}"
    hold = DemandHold(etcd, ModelDirectory(etcd), scheduler_address="", redis_client=redis.client)
    slow = FinishedCall(FinishedCall.Job(model), completion_tokens=10)
    fast = FinishedCall(FinishedCall.Job(model), completion_tokens=10)
    hold.started(slow, opened_at=time.monotonic() - 0.5)  # first token 0.5 s after arrival
    hold.started(fast, opened_at=time.monotonic())
    await hold.finished(slow)
    await hold.finished(fast)

    job = serving_job(f"job-{model}", model)
    signals = await Autoscaler(etcd, lambda: {}, redis).signals(job)
    assert signals.ttft_miss == pytest.approx(0.5)  # one of two over the 100 ms objective
    assert signals.recent_requests == 2


async def test_recorded_usage_is_read_back_per_tenant_and_model(
    stores: tuple[EtcdStore, RedisStore],
) -> None:
    _, redis = stores
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    await UsageMeter(redis.client).record(tenant, "org/m:v1", 12, 3)
    await UsageMeter(redis.client).record(tenant, "org/m:v1", 8, 1)
    [row] = await UsageMeter(redis.client).read(tenant=tenant)
    assert (row.model, row.requests, row.prompt_tokens, row.completion_tokens) == (
        "org/m:v1",
        2,
        20,
        4,
    )
