"""The autoscaler's loop: gathers each deployment's signals, applies the policy's decisions.

Runs on the jobmgr leader only. Signals: live instances (the controller's etcd mirror), their
load reports (Redis: queued, running, KV use, tokens/s), recent request latencies (Redis,
written by the gateway) and held demand (etcd `/deepserve/demand/`, watched: a gateway holding
a request for a model at zero replicas wakes this loop at once). A decision is written as the
job's new replica count by compare-and-swap, with an "Autoscaled" event saying why; the
reconciler, woken by the job's change, does the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping

from deepserve.errors import DeepServeError
from deepserve.jobmgr.autoscaler import Decision, GroupLoad, ScalerMemory, Signals, applied, decide
from deepserve.jobs.records import JobKind, JobRecord
from deepserve.jobs.store import JobStore
from deepserve.records import InstanceRecord, Role
from deepserve.scaling.demand import DemandRecord, demands, waiting_for
from deepserve.scaling.latency import miss_fractions, read_latency
from deepserve.store.etcd import EtcdStore, Versioned
from deepserve.store.informer import Informer
from deepserve.store.redis_messages import LoadReport
from deepserve.store.redis_store import RedisStore

log = logging.getLogger(__name__)


class Autoscaler:
    """Sizes every autoscaled deployment from its load, latency and demand."""

    def __init__(
        self,
        store: EtcdStore,
        instances: Callable[[], Mapping[str, InstanceRecord]],
        redis: RedisStore | None,
        *,
        interval_s: float = 1.0,
        demand_ttl_s: float = 30.0,
        slo_window_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._jobs = JobStore(store)
        self._instances = instances
        self._redis = redis
        self.demand: Informer[DemandRecord] = Informer(demands(store))
        self.interval_s = interval_s
        self.demand_ttl_s = demand_ttl_s
        self.slo_window_s = slo_window_s
        self._clock = clock
        self._memory: dict[str, ScalerMemory] = defaultdict(ScalerMemory)
        self.wake = asyncio.Event()
        self.decisions: list[tuple[str, Decision]] = []
        self.demand.add_handler(lambda *_: self.wake.set())

    def start(self) -> None:
        self.demand.start()

    async def stop(self) -> None:
        await self.demand.stop()

    async def run(self) -> None:
        """Passes until cancelled (the controller runs it while it leads)."""
        await self.demand.ready.wait()
        while True:
            self.wake.clear()
            try:
                await self.pass_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("autoscaler pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.interval_s)

    async def pass_once(self) -> list[tuple[str, Decision]]:
        """One look at every serving job; returns the decisions it applied."""
        made: list[tuple[str, Decision]] = []
        jobs = await self._jobs.list(JobKind.SERVING)
        live = {j.record.job_id for j in jobs}
        for job_id in list(self._memory):
            if job_id not in live:
                del self._memory[job_id]
        for job in jobs:
            record = job.record
            spec = record.serving
            if (
                spec is None
                or not spec.autoscaling.enabled
                or record.status.phase.terminal
                or record.delete_requested
            ):
                continue
            signals = await self.signals(record)
            memory = self._memory[record.job_id]
            decision = decide(spec, spec.replicas, signals, memory)
            if decision is None or decision.replicas == spec.replicas:
                continue
            if await self._apply(job, decision):
                applied(memory, spec.replicas, decision.replicas, signals.now)
                made.append((record.job_id, decision))
        self.decisions.extend(made)
        del self.decisions[:-100]
        return made

    async def signals(self, job: JobRecord) -> Signals:
        assert job.serving is not None
        spec = job.serving
        now = self._clock()
        mine = [i for i in self._instances().values() if i.job_id == job.job_id]
        loads = await self._loads([i.instance_id for i in mine])
        by_role: dict[Role, list[LoadReport]] = defaultdict(list)
        counts: dict[Role, int] = defaultdict(int)
        for instance in mine:
            counts[instance.role] += 1
            load = loads.get(instance.instance_id)
            if load is not None:
                by_role[instance.role].append(load)
        groups = {role: _group(counts[role], by_role[role]) for role in counts}
        ttft_miss = tpot_miss = 0.0
        recent = 0
        policy = spec.autoscaling
        slo = policy.ttft_slo_ms > 0 or policy.tpot_slo_ms > 0
        idle_window = policy.scale_to_zero_after_s
        if self._redis is not None and (slo or idle_window > 0):
            window = max(self.slo_window_s if slo else 0.0, idle_window)
            try:
                samples = await read_latency(self._redis.client, spec.model, window)
            except Exception as exc:  # Redis is lossy-tolerable
                log.warning("reading latencies failed: %s", exc)
                samples = []
            in_slo_window = [s for s in samples if now - s.at <= self.slo_window_s]
            ttft_miss, tpot_miss = miss_fractions(
                in_slo_window, policy.ttft_slo_ms / 1000, policy.tpot_slo_ms / 1000
            )
            recent = sum(1 for s in samples if now - s.at <= idle_window)
        wanted = waiting_for(self.demand.items.values(), spec.model, now, self.demand_ttl_s) > 0
        return Signals(
            now=now,
            groups=groups,
            ttft_miss=ttft_miss,
            tpot_miss=tpot_miss,
            demand=wanted,
            recent_requests=recent,
        )

    async def _loads(self, instance_ids: list[str]) -> dict[str, LoadReport]:
        if self._redis is None or not instance_ids:
            return {}
        try:
            return await self._redis.read_loads(instance_ids)
        except Exception as exc:
            log.warning("reading load reports failed: %s", exc)
            return {}

    async def _apply(self, job: Versioned[JobRecord], decision: Decision) -> bool:
        expected = job.record.serving.replicas if job.record.serving else 0
        changed = False

        def resize(record: JobRecord) -> JobRecord | None:
            nonlocal changed
            spec = record.serving
            # Someone else (a user's ScaleJob, another pass) changed it: decide again next pass.
            if spec is None or spec.replicas != expected or record.status.phase.terminal:
                return None
            record.record_event(
                "Autoscaled", f"replicas {spec.replicas} -> {decision.replicas}: {decision.reason}"
            )
            record.serving = spec.model_copy(update={"replicas": decision.replicas})
            changed = True
            return record

        try:
            await self._jobs.update(job.record.job_id, resize)
        except DeepServeError as exc:
            log.warning("autoscaling %s failed: %s", job.record.job_id, exc)
            return False
        if changed:
            log.info(
                "autoscaled",
                extra={
                    "fields": {
                        "job_id": job.record.job_id,
                        "replicas": decision.replicas,
                        "reason": decision.reason,
                    }
                },
            )
        return changed


def _group(instances: int, loads: list[LoadReport]) -> GroupLoad:
    requests = sum(x.running + x.waiting for x in loads)
    usage = [x.kv_use for x in loads if x.kv_blocks_total]
    return GroupLoad(
        instances=instances,
        requests=requests,
        kv_usage=sum(usage) / len(usage) if usage else 0.0,
        tokens_per_s=sum(x.tokens_per_s for x in loads),
    )
