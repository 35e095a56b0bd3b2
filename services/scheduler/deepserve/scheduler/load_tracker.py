"""Instance load as routing sees it: the latest report from Redis plus requests routed since.

Engines publish a load report (running, waiting, KV blocks used) every half second or so. A
burst of requests between two reports would all see the same "least loaded" instance, so each
decision also counts the request against its instance until the next report arrives. Those
counts live in Redis too (a hash per instance keyed by the report they follow), so every
scheduler replica sees the others' decisions: the load a replica routes by is shared state.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from deepserve.background import stop_task
from deepserve.store.redis_keys import RedisKeys
from deepserve.store.redis_messages import LoadReport, RoutedSince
from deepserve.store.redis_store import RedisStore

log = logging.getLogger(__name__)

ROUTED_TTL_S = 30


@dataclass(frozen=True, slots=True)
class InstanceLoad:
    """One instance's load: its last report plus the requests routed to it since."""

    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    routed_since_report: int = 0
    report_at: float = 0.0

    @property
    def kv_use(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    def score(self, kv_weight: float) -> float:
        """Queued + running requests (reported and routed since), plus KV pressure."""
        return self.running + self.waiting + self.routed_since_report + kv_weight * self.kv_use

    @classmethod
    def from_report(cls, report: LoadReport, routed: int = 0) -> InstanceLoad:
        return cls(
            running=report.running,
            waiting=report.waiting,
            kv_blocks_used=report.kv_blocks_used,
            kv_blocks_total=report.kv_blocks_total,
            routed_since_report=routed,
            report_at=report.at,
        )


class LoadTracker:
    """Mirrors the live instances' loads from Redis every `refresh_s` (never on the route path)."""

    def __init__(
        self,
        redis: RedisStore | None,
        live_ids: Callable[[], list[str]],
        *,
        refresh_s: float = 0.1,
        kv_weight: float = 4.0,
    ) -> None:
        self._redis = redis
        self._live_ids = live_ids
        self._refresh_s = refresh_s
        self.kv_weight = kv_weight
        self._loads: dict[str, InstanceLoad] = {}
        # Scores of the last view, precomputed: routing reads these for every candidate.
        self._base_scores: dict[str, float] = {}
        # Explicit cached contexts each instance holds pinned, from its last report.
        self._pinned: dict[str, frozenset[str]] = {}
        # LoRA adapters each instance holds, from its last report, plus those this replica
        # routed there since (a burst for a new adapter stays on the instance loading it).
        self._adapters: dict[str, frozenset[str]] = {}
        self._adapters_routed: dict[str, set[str]] = {}
        # Routed by this replica since the last flush to Redis.
        self._unflushed: Counter[str] = Counter()
        # Being written to Redis now; still counted until the next view includes them.
        self._flushing: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None
        self.refreshes = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="load-tracker")

    async def stop(self) -> None:
        await stop_task(self._task)

    def load_of(self, instance_id: str) -> InstanceLoad:
        base = self._loads.get(instance_id, InstanceLoad())
        extra = self._unflushed.get(instance_id, 0) + self._flushing.get(instance_id, 0)
        if not extra:
            return base
        return InstanceLoad(
            base.running,
            base.waiting,
            base.kv_blocks_used,
            base.kv_blocks_total,
            base.routed_since_report + extra,
            base.report_at,
        )

    def scores(self, instance_ids: Iterable[str]) -> dict[str, float]:
        """Each instance's load score (see `InstanceLoad.score`), routed requests included."""
        base, unflushed, flushing = self._base_scores, self._unflushed, self._flushing
        if not unflushed and not flushing:
            return {i: base.get(i, 0.0) for i in instance_ids}
        return {
            i: base.get(i, 0.0) + unflushed.get(i, 0) + flushing.get(i, 0) for i in instance_ids
        }

    def holders(self, context_id: str, instance_ids: Iterable[str]) -> list[str]:
        """Those of `instance_ids` whose last report says they hold `context_id` pinned."""
        empty: frozenset[str] = frozenset()
        return [i for i in instance_ids if context_id in self._pinned.get(i, empty)]

    def adapter_holders(self, adapter: str, instance_ids: Iterable[str]) -> list[str]:
        """Those of `instance_ids` that hold `adapter` (reported) or were just sent it."""
        empty: frozenset[str] = frozenset()
        return [
            i
            for i in instance_ids
            if adapter in self._adapters.get(i, empty)
            or adapter in self._adapters_routed.get(i, ())
        ]

    def note_adapter_routed(self, instance_id: str, adapter: str) -> None:
        self._adapters_routed.setdefault(instance_id, set()).add(adapter)

    def set_adapters(self, adapters: dict[str, frozenset[str]]) -> None:
        """Replaces the held-adapter mirror; what reports now show needs no local note."""
        self._adapters = dict(adapters)
        for instance_id in list(self._adapters_routed):
            if instance_id not in adapters:
                continue
            self._adapters_routed[instance_id] -= adapters[instance_id]
            if not self._adapters_routed[instance_id]:
                del self._adapters_routed[instance_id]

    def set_pinned(self, pinned: dict[str, frozenset[str]]) -> None:
        """Replaces the pinned-context mirror (tests drive routing without Redis this way)."""
        self._pinned = dict(pinned)

    def note_routed(self, instance_id: str) -> None:
        self._unflushed[instance_id] += 1

    def set_loads(self, loads: dict[str, InstanceLoad]) -> None:
        """Replaces the mirror (tests and benchmarks drive routing without Redis this way)."""
        self._loads = dict(loads)
        self._base_scores = {i: load.score(self.kv_weight) for i, load in loads.items()}

    async def refresh(self) -> None:
        """Flushes this replica's routed counts, then reads every live instance's load."""
        if self._redis is None:
            return
        client = self._redis.client
        flush, self._unflushed = self._unflushed, Counter()
        self._flushing = flush
        if flush:
            async with client.pipeline(transaction=False) as pipe:
                for instance_id, count in flush.items():
                    key = RedisKeys.routed(instance_id)
                    at = self._loads.get(instance_id, InstanceLoad()).report_at
                    added = RoutedSince(at, count)
                    pipe.hincrby(key, added.field, added.count)
                    pipe.expire(key, ROUTED_TTL_S)
                await pipe.execute()
        live = self._live_ids()
        reports = await self._redis.read_loads(live)
        no_report = LoadReport()
        async with client.pipeline(transaction=False) as pipe:
            for instance_id in live:
                at = reports.get(instance_id, no_report).at
                pipe.hget(RedisKeys.routed(instance_id), RoutedSince.field_for(at))
            replies = await pipe.execute()
        loads: dict[str, InstanceLoad] = {}
        pinned: dict[str, frozenset[str]] = {}
        adapters: dict[str, frozenset[str]] = {}
        for instance_id, raw in zip(live, replies, strict=True):
            report = reports.get(instance_id, no_report)
            routed = RoutedSince.decode(report.at, raw)
            loads[instance_id] = InstanceLoad.from_report(report, routed.count)
            if report.pinned_contexts:
                pinned[instance_id] = frozenset(report.pinned_contexts)
            if report.adapters:
                adapters[instance_id] = frozenset(report.adapters)
        self.set_loads(loads)
        self.set_pinned(pinned)
        self.set_adapters(adapters)
        self._flushing = Counter()
        self.refreshes += 1

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # lossy-tolerable: keep routing on the last view
                log.warning("reading loads failed: %s", exc)
            await asyncio.sleep(self._refresh_s)
