"""The pre-warmed pod pool: hand a task a warm pod, start one cold when none is free, refill.

Warm pods have imported the engine runtime and probed the device but hold no model (the paper's
pre-warmed pods and TEs, scale-up steps 1 and 2). Acquire claims one by compare-and-swap on its
etcd record (so two claimers never share a pod), asks it to load the task's model, and wakes the
refill loop, which keeps `warm_target` unclaimed pods ready in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from opentelemetry import trace

from deepserve.background import stop_task
from deepserve.errors import (
    Conflict,
    DeadlineExceeded,
    DeepServeError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from deepserve.podpool.backend import PodBackend
from deepserve.podpool.pod_agent import LoadResult
from deepserve.podpool.pod_view import PodView
from deepserve.podpool.weights_planner import WeightsPlanner
from deepserve.records import PodPurpose, PodRecord, PodState, Role
from deepserve.scaling.timeline import ScaleStep, ScaleTimeline
from deepserve.scaling.weights_plan import WeightsPlan
from deepserve.store.coalescer import Coalescer

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

# Pods one claim transaction takes at most (etcd's --max-txn-ops is 128 by default).
CLAIMS_PER_TXN = 64
# Least seconds between two pods started to re-spread the warm supply (a host that cannot
# start pods then costs one pod there and back per interval, not a loop).
RESPREAD_INTERVAL_S = 10.0


def new_pod_id() -> str:
    return f"pod-{uuid.uuid4().hex[:10]}"


class Placement(Protocol):
    """Where a task's pod should be (node_placement): optional, Kubernetes only."""

    def order(
        self, candidates: list[PodRecord], model: str, tp_size: int = 1
    ) -> list[PodRecord]: ...

    def before_cold_start(self, pod_id: str, model: str, tp_size: int = 1) -> None: ...


class PodAgent(Protocol):
    """Loads and unloads a pod's model (LoadModel / UnloadModel on its shell)."""

    async def load(
        self,
        address: str,
        *,
        model: str,
        role: Role,
        job_id: str,
        task_id: str,
        tensor_parallel_size: int,
        weights: WeightsPlan | None = None,
    ) -> LoadResult: ...

    async def unload(self, address: str) -> None: ...


@dataclass(frozen=True, slots=True)
class PodRequest:
    """What a task needs from a pod."""

    task_id: str
    model: str
    role: Role = Role.COLOCATED
    job_id: str = ""
    tensor_parallel_size: int = 1
    purpose: PodPurpose = PodPurpose.SERVING


@dataclass(frozen=True, slots=True)
class AcquiredPod:
    """A pod serving the task's model, and how it got there."""

    pod: PodRecord
    cold_start: bool
    instance_id: str
    load_seconds: float
    claim_seconds: float
    # The scale-up's five steps with their durations, and the weights' source.
    timeline: ScaleTimeline = field(default_factory=ScaleTimeline)


class WarmPodPool:
    """Keeps `warm_target` warm pods and hands them to tasks."""

    def __init__(
        self,
        view: PodView,
        backend: PodBackend,
        agent: PodAgent,
        *,
        warm_target: int,
        max_pods: int = 64,
        start_timeout_s: float = 120.0,
        planner: WeightsPlanner | None = None,
        max_concurrent_loads: int = 0,
        refill_defer_s: float = 0.0,
        placement: Placement | None = None,
    ) -> None:
        self.view = view
        # Prefers pods on nodes that hold the task's weights; None: any pod.
        self.placement = placement
        # Picks each load's weights source (DRAM copy, fork, disk); None lets the pod pick.
        self.planner = planner
        self.backend = backend
        self.agent = agent
        self.warm_target = warm_target
        # When the last pod was started to re-spread the warm supply over hosts (monotonic).
        self._last_respread = float("-inf")
        self.max_pods = max_pods
        self.start_timeout_s = start_timeout_s
        self.cold_starts = 0
        self.warm_hits = 0
        # Pods this pool started that have not registered yet, with their start time.
        self._starting: dict[str, float] = {}
        # Pods started cold for one acquire: never handed to another task, never trimmed.
        self._reserved: set[str] = set()
        # Pods this pool claimed (or is claiming) that its view may not show assigned yet:
        # pod id -> (model, host). Concurrent claims of one model spread over hosts with them.
        self._claiming: dict[str, tuple[str, str]] = {}
        self._wake = asyncio.Event()
        self._refill_task: asyncio.Task[None] | None = None
        # Concurrent acquires claim their pods in one etcd transaction (group commit).
        self._claims: Coalescer[PodRequest, PodRecord | None] = Coalescer(self._claim_many)
        # New warm pods wait while a burst is loading (they would take its cores): until no
        # load is in flight and no acquire came for `refill_defer_s`, or 10x that at most.
        self.refill_defer_s = refill_defer_s
        self._loads_in_flight = 0
        self._last_acquire = -1e9
        self._deferring_since: float | None = None
        self._load_slots = (
            asyncio.Semaphore(max_concurrent_loads)
            if max_concurrent_loads > 0
            else contextlib.nullcontext()
        )

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._refill_task = asyncio.create_task(self._refill_loop(), name="podpool-refill")

    async def close(self) -> None:
        await stop_task(self._refill_task)
        await self.backend.close()

    @property
    def claim_flushes(self) -> int:
        """Claim transactions so far (each claims the pods of every acquire queued for it)."""
        return self._claims.flushes

    # --- acquire / release -----------------------------------------------------------------

    async def acquire(self, request: PodRequest) -> AcquiredPod:
        """Claims a warm pod (or starts one cold), loads the task's model on it (unless the task
        claims it for training), and returns it.

        Idempotent per task: a retry after a lost reply finds the pod already assigned to it.
        """
        started = self._last_acquire = time.monotonic()
        cold = False
        self.backend.check_model(request.model)
        with tracer.start_as_current_span("scale_up.pod_acquired") as span:
            pod = self._assigned_to(request.task_id)
            if pod is None:
                pod = await self._claim_warm(request)
            if pod is None:
                cold = True
                pod = await self._start_cold(request)
            span.set_attribute("deepserve.pod_id", pod.pod_id)
            span.set_attribute("deepserve.cold_start", cold)
        claim_seconds = time.monotonic() - started
        if cold:
            self.cold_starts += 1
        else:
            self.warm_hits += 1
        self._wake.set()  # a warm pod was used up: refill in the background
        if request.purpose is PodPurpose.TRAINING:
            # The task runs its own work on the pod: an idle serving engine beside it would
            # hold memory and slow it down (measured: ~25% fewer training tokens/s on CPU).
            log.info(
                "pod claimed for training",
                extra={"fields": {"pod_id": pod.pod_id, "task_id": request.task_id}},
            )
            current = self.view.get(pod.pod_id) or pod
            timeline = scale_up_timeline(ScaleTimeline(), pod.pod_id, cold, claim_seconds)
            return AcquiredPod(current, cold, "", 0.0, claim_seconds, timeline)
        self._loads_in_flight += 1
        try:
            async with self._load_slots, self._weights_plan(pod, request) as plan:
                result = await self.agent.load(
                    pod.address,
                    model=request.model,
                    role=request.role,
                    job_id=request.job_id,
                    task_id=request.task_id,
                    tensor_parallel_size=request.tensor_parallel_size,
                    weights=plan,
                )
        except DeepServeError as exc:
            # A refusal (bad model, wrong state) leaves the pod intact and warm again; a pod
            # that did not answer is in an unknown state and is ended.
            intact = isinstance(exc, InvalidArgument | NotFound | FailedPrecondition)
            log.warning(
                "model load failed",
                extra={
                    "fields": {
                        "pod_id": pod.pod_id,
                        "task_id": request.task_id,
                        "error": str(exc),
                        "pod": "kept" if intact else "ended",
                    }
                },
            )
            if intact:
                await self._unclaim(pod.pod_id, request.task_id)
            else:
                await self._end(pod)
            raise
        finally:
            self._loads_in_flight -= 1
            self._last_acquire = time.monotonic()
        if self.planner is not None and self.planner.dram is not None:
            # Recent demand: keep (or make) this model's DRAM copy for the next scale-up.
            self.planner.dram.note_demand(request.model, request.tensor_parallel_size)
        current = self.view.get(pod.pod_id) or pod
        timeline = scale_up_timeline(result.timeline, pod.pod_id, cold, claim_seconds)
        return AcquiredPod(
            current, cold, result.instance_id, result.load_seconds, claim_seconds, timeline
        )

    def _weights_plan(
        self, pod: PodRecord, request: PodRequest
    ) -> contextlib.AbstractAsyncContextManager[WeightsPlan | None]:
        if self.planner is None:
            return contextlib.nullcontext(None)
        return self.planner.plan(pod, request.model, request.tensor_parallel_size)

    async def release(self, pod_id: str, *, terminate: bool = False) -> str:
        """Returns the pod to the warm pool, or ends it; says which ("returned", "ended", "gone")."""
        pod = self.view.get(pod_id)
        if pod is None:
            found = await self.view.records.get(pod_id)
            if found is None:
                return "gone"  # already dead: releasing is idempotent
            pod = found.record
        keep = (
            not terminate
            and self._warm_supply() < self.warm_target
            and len(self.view.list()) <= self.max_pods
        )
        if keep:
            try:
                await self.agent.unload(pod.address)
                self._wake.set()
                return "returned"
            except DeepServeError as exc:
                log.warning("unload failed; ending the pod", extra={"fields": {"error": str(exc)}})
        await self._end(pod)
        self._wake.set()
        return "ended"

    # --- claiming --------------------------------------------------------------------------

    def _assigned_to(self, task_id: str) -> PodRecord | None:
        for pod in self.view.list(PodState.ASSIGNED):
            if pod.task_id == task_id:
                return pod
        return None

    def _claimable(self) -> list[PodRecord]:
        warm = [p for p in self.view.list(PodState.WARM) if p.pod_id not in self._reserved]
        return sorted(warm, key=lambda p: (p.created_at, p.pod_id))

    def _warm_supply(self) -> int:
        starting = [p for p in self._starting if p not in self._reserved]
        return len(self._claimable()) + len(starting)

    async def _claim(self, pod_id: str, request: PodRequest) -> PodRecord | None:
        """Marks a warm pod assigned to the task by CAS; None if someone else got it first."""
        found = await self.view.records.get(pod_id)
        if found is None or found.record.state != PodState.WARM or found.record.task_id:
            return None
        claimed = _claimed(found.record, request)
        try:
            await self.view.records.compare_and_swap(
                pod_id, claimed, found.mod_revision, lease_id=found.lease_id or None
            )
        except Conflict:
            return None
        log.info("pod claimed", extra={"fields": {"pod_id": pod_id, "task_id": request.task_id}})
        return claimed

    async def _unclaim(self, pod_id: str, task_id: str) -> None:
        """Hands a claimed pod back to the pool (its load was refused, nothing was loaded)."""
        found = await self.view.records.get(pod_id)
        if found is None or found.record.task_id != task_id:
            return
        warm = found.record.model_copy(update={"state": PodState.WARM, "task_id": "", "model": ""})
        with contextlib.suppress(Conflict):
            await self.view.records.compare_and_swap(
                pod_id, warm, found.mod_revision, lease_id=found.lease_id or None
            )
        self._wake.set()

    async def _claim_warm(self, request: PodRequest) -> PodRecord | None:
        return await self._claims.submit(request)

    async def _claim_many(self, requests: list[PodRequest]) -> list[PodRecord | None]:
        """Claims a distinct warm pod for each request: one read of the pods, one transaction
        per `CLAIMS_PER_TXN` (not a read and a CAS per pod); None where no warm pod is left."""
        found, _ = await self.view.records.list()
        free = sorted(
            (
                f
                for f in found
                if f.record.state == PodState.WARM
                and not f.record.task_id
                and f.record.pod_id not in self._reserved
            ),
            key=lambda f: (f.record.created_at, f.record.pod_id),
        )
        # Replicas of a model spread over hosts: each request takes the oldest free pod on the
        # host serving (or being claimed for) the fewest of its model, counting this batch.
        serving = {model: self._serving_hosts(model) for model in {r.model for r in requests}}
        results: list[PodRecord | None] = []
        for start in range(0, len(requests), CLAIMS_PER_TXN):
            chunk = requests[start : start + CLAIMS_PER_TXN]
            picks = []
            for request in chunk:
                if not free:
                    break
                hosts = serving[request.model]
                pick = min(free, key=lambda f, h=hosts: h[f.record.host])  # oldest of ties
                if self.placement is not None:
                    # Nodes that hold the model's weights first (Kubernetes node agents).
                    first = self.placement.order(
                        [f.record for f in free], request.model, request.tensor_parallel_size
                    )[0]
                    pick = next(f for f in free if f.record.pod_id == first.pod_id)
                free.remove(pick)
                hosts[pick.record.host] += 1
                picks.append((request, pick))
            claimed = [_claimed(f.record, r) for r, f in picks]
            try:
                if picks:
                    await self.view.records.compare_and_swap_many(
                        [
                            (f.record.pod_id, c, f.mod_revision, f.lease_id or None)
                            for (_, f), c in zip(picks, claimed, strict=True)
                        ]
                    )
            except Conflict:
                # A pod changed since the read (it ended, another pool replica claimed it):
                # claim one by one for this chunk.
                claimed = [await self._claim_one_by_one(r) for r in chunk]
                results.extend(claimed)
                continue
            for pod in claimed:
                self._claiming[pod.pod_id] = (pod.model, pod.host)
                log.info(
                    "pod claimed", extra={"fields": {"pod_id": pod.pod_id, "task_id": pod.task_id}}
                )
            results.extend(claimed)
            results.extend([None] * (len(chunk) - len(picks)))
        return results

    async def _claim_one_by_one(self, request: PodRequest) -> PodRecord | None:
        candidates = self._claimable()
        if len(candidates) > 1:
            # Concurrent acquires start at different pods (by task), so a burst of N does not
            # race N ways for the same first pod and retry down the list.
            start = zlib.crc32(request.task_id.encode()) % len(candidates)
            candidates = candidates[start:] + candidates[:start]
            # Then replicas of a model spread over hosts (a stable sort keeps that order among
            # equals): a host's loss takes fewer of them, and a new replica's fork crosses hosts.
            serving = self._serving_hosts(request.model)
            candidates.sort(key=lambda p: serving[p.host])
        if self.placement is not None:
            candidates = self.placement.order(
                candidates, request.model, request.tensor_parallel_size
            )
        for candidate in candidates:
            self._claiming[candidate.pod_id] = (request.model, candidate.host)
            claimed = await self._claim(candidate.pod_id, request)
            if claimed is not None:
                return claimed
            self._claiming.pop(candidate.pod_id, None)
        return None

    def _serving_hosts(self, model: str) -> Counter[str]:
        """Pods per host that serve (or are being claimed for) `model`."""
        hosts = Counter(p.host for p in self.view.list(PodState.ASSIGNED) if p.model == model)
        for pod_id, (claimed_model, host) in list(self._claiming.items()):
            seen = self.view.get(pod_id)
            if seen is None or seen.state != PodState.WARM:
                del self._claiming[pod_id]  # the view shows the claim now (or the pod is gone)
            elif claimed_model == model:
                hosts[host] += 1
        return hosts

    async def _start_cold(self, request: PodRequest) -> PodRecord:
        pod_id = new_pod_id()
        self._reserved.add(pod_id)
        if self.placement is not None:
            self.placement.before_cold_start(pod_id, request.model, request.tensor_parallel_size)
        try:
            await self._create(pod_id)
            deadline = time.monotonic() + self.start_timeout_s
            while time.monotonic() < deadline:
                registered = await self.view.wait_for(
                    lambda pods: (
                        pods.get(pod_id) is not None and pods[pod_id].state == PodState.WARM
                    ),
                    timeout_s=1.0,
                )
                if registered:
                    claimed = await self._claim(pod_id, request)
                    if claimed is not None:
                        return claimed
                    # Another pool replica took it; fall back to any other warm pod.
                    other = await self._claim_one_by_one(request)
                    if other is not None:
                        return other
                elif not self.backend.is_starting(pod_id):
                    raise Unavailable(f"pod {pod_id} exited before registering")
            raise DeadlineExceeded(f"pod {pod_id} did not register in {self.start_timeout_s:.0f}s")
        except BaseException:
            pod = self.view.get(pod_id)
            if pod is None or pod.task_id != request.task_id:
                with contextlib.suppress(Exception):
                    await self.backend.delete_pod(
                        pod
                        or PodRecord(
                            pod_id=pod_id, state=PodState.STARTING, address="", host="", pid=0
                        )
                    )
            raise
        finally:
            self._reserved.discard(pod_id)
            self._starting.pop(pod_id, None)

    async def _create(self, pod_id: str) -> None:
        self._starting[pod_id] = time.monotonic()
        try:
            await self.backend.create_pod(pod_id)
        except BaseException:
            self._starting.pop(pod_id, None)
            raise

    async def _end(self, pod: PodRecord, *, only_if_warm: bool = False) -> None:
        """Marks the pod terminating and deletes it.

        `only_if_warm`: for a surplus warm pod, counted before the awaits of a refill pass. A
        claim may have won it since (a CI run saw a pod ended 1 ms after its claim, mid-load),
        so it goes only if its record is still warm, by a compare-and-swap that a concurrent
        claim's own swap excludes."""
        if only_if_warm and pod.pod_id in self._reserved:
            return
        found = await self.view.records.get(pod.pod_id)
        if only_if_warm and (found is None or found.record.state != PodState.WARM):
            return
        if found is not None:
            marked = found.record.model_copy(update={"state": PodState.TERMINATING})
            try:
                await self.view.records.compare_and_swap(
                    pod.pod_id, marked, found.mod_revision, lease_id=found.lease_id or None
                )
            except Conflict:
                if only_if_warm:
                    return  # claimed (or changed) since it was read
        await self.backend.delete_pod(pod)

    # --- refill ----------------------------------------------------------------------------

    async def _refill_loop(self) -> None:
        await self.view.ready.wait()
        while True:
            self._wake.clear()
            self.view.changed.clear()
            try:
                await self.refill_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("refilling the warm pool failed")
            waiters = [
                asyncio.create_task(self._wake.wait()),
                asyncio.create_task(self.view.changed.wait()),
            ]
            deferred = self._refill_deferred_for()
            timeout = 1.0 if deferred is None else min(1.0, max(deferred, 0.02))
            try:
                await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()

    def _refill_deferred_for(self) -> float | None:
        """Seconds new warm pods still wait for a burst to finish loading; None: not waiting."""
        if self.refill_defer_s <= 0:
            return None
        now = time.monotonic()
        busy = self._loads_in_flight > 0 or now - self._last_acquire < self.refill_defer_s
        if not busy:
            self._deferring_since = None
            return None
        if self._deferring_since is None:
            self._deferring_since = now
        left_in_cap = self._deferring_since + 10 * self.refill_defer_s - now
        if left_in_cap <= 0:
            return None
        quiet_in = max(self.refill_defer_s - (now - self._last_acquire), 0.05)
        return min(quiet_in, left_in_cap)

    async def refill_once(self) -> None:
        """One level-triggered pass: start pods up to the target, end surplus warm ones."""
        for pod_id in self.backend.reap():
            if pod_id in self._starting and self.view.get(pod_id) is None:
                log.warning("pod exited before registering", extra={"fields": {"pod_id": pod_id}})
            self._starting.pop(pod_id, None)
        now = time.monotonic()
        for pod_id, since in list(self._starting.items()):
            if pod_id in self._reserved:
                continue
            if self.view.get(pod_id) is not None:
                del self._starting[pod_id]
            elif now - since > self.start_timeout_s:
                log.warning("pod did not register in time", extra={"fields": {"pod_id": pod_id}})
                del self._starting[pod_id]
                await self.backend.delete_pod(
                    PodRecord(pod_id=pod_id, state=PodState.STARTING, address="", host="", pid=0)
                )
        supply = self._warm_supply()
        total = len(self.view.list()) + len(self._starting)
        if self._refill_deferred_for() is None:
            for _ in range(min(self.warm_target - supply, self.max_pods - total)):
                await self._create(new_pod_id())
            if (
                supply == self.warm_target
                and not self._starting
                and total < self.max_pods
                and now - self._last_respread >= RESPREAD_INTERVAL_S
                and self.backend.warm_unevenly_spread()
            ):
                # A host came back (or joined) after the supply filled up on the others: one
                # more pod, which the backend places on the emptiest host; the surplus pass
                # below then ends one on the most crowded. Without it the supply stays where
                # it is until claims turn it over (a multihost CI run waited 240 s for it).
                self._last_respread = now
                await self._create(new_pod_id())
        if supply > self.warm_target:
            surplus = [p for p in self._claimable() if self.backend.started_here(p.pod_id)]
            for pod in _crowded_first(surplus, self._claimable(), supply - self.warm_target):
                await self._end(pod, only_if_warm=True)


def _claimed(pod: PodRecord, request: PodRequest) -> PodRecord:
    """The pod's record once claimed for the request (what the pod itself would write)."""
    return pod.model_copy(
        update={
            "state": PodState.ASSIGNED,
            "task_id": request.task_id,
            "model": request.model,
            "role": request.role,
        }
    )


def _crowded_first(surplus: list[PodRecord], warm: list[PodRecord], n: int) -> list[PodRecord]:
    """`n` pods of `surplus` to end: each from the host with the most warm pods then (newest
    first among its pods), so the warm supply stays spread over hosts (one host's loss, or a
    burst's claims, then leave warm pods elsewhere). On one host: simply the newest."""
    crowd = Counter(p.host for p in warm)
    left = surplus[::-1]
    chosen: list[PodRecord] = []
    for _ in range(min(n, len(left))):
        pod = max(left, key=lambda p: crowd[p.host])  # max keeps the first (newest) of ties
        left.remove(pod)
        crowd[pod.host] -= 1
        chosen.append(pod)
    return chosen


def scale_up_timeline(
    pod_steps: ScaleTimeline, pod_id: str, cold: bool, claim_seconds: float
) -> ScaleTimeline:
    """Adds step 1 to the pod's steps 2-5. A warm pod's engine start happened before the
    scale-up (off its critical path, so 0s here); a cold pod's start is part of the claim."""
    timeline = ScaleTimeline()
    timeline.merge(pod_steps)
    started_in = timeline.seconds(ScaleStep.ENGINE_STARTED) or 0.0
    if cold:
        timeline.record(
            ScaleStep.POD_ACQUIRED,
            claim_seconds - started_in,
            f"cold start: no warm pod was free, started {pod_id}",
        )
        if started_in:
            timeline.record(ScaleStep.ENGINE_STARTED, started_in, "new process: imports, device")
    else:
        timeline.record(ScaleStep.POD_ACQUIRED, claim_seconds, f"warm pod {pod_id}")
        timeline.record(
            ScaleStep.ENGINE_STARTED,
            0.0,
            f"pre-warmed (its runtime start took {started_in:.2f}s, before the scale-up)",
        )
    return timeline
