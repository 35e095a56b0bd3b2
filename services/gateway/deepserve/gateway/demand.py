"""Scale from zero and latency reports: the gateway's part of the autoscaling loop.

`hold(model)`: a request for a model that has no live instance but an autoscaled deployment
(which may sit at zero replicas) waits here instead of failing. The first such request writes
a demand record to etcd (`/deepserve/demand/<model>`), which wakes jobmgr's autoscaler at once;
the request is released the moment an instance of the model is registered *and* the scheduler
routes to it, or answered 503 with Retry-After when `hold_timeout_s` passes. The record is
refreshed while requests wait and removed when none does.

`started(call, opened_at)` / `finished(call)`: each request's time to first token and time
per output token go to Redis (`deepserve.scaling.latency`), where the autoscaler counts SLO
misses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from typing import Any

from pydantic import BaseModel, ConfigDict

from deepserve.errors import DeepServeError, Unavailable
from deepserve.gateway.model_directory import ModelDirectory
from deepserve.scaling.demand import DemandRecord, demands
from deepserve.scaling.latency import record_latency
from deepserve.store.etcd import EtcdStore, TypedPrefix
from deepserve.store.informer import Informer
from deepserve.store.keys import Keys
from deepserve.v1 import scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)


class _DeploymentView(BaseModel):
    """The few fields of a jobmgr job record the gateway needs (read-only, extra ignored)."""

    model_config = ConfigDict(extra="ignore")

    kind: str = ""
    serving: dict[str, Any] | None = None
    status: dict[str, Any] = {}
    delete_requested: bool = False

    def scalable_model(self) -> str | None:
        """The model this deployment can bring up from zero, if it can."""
        serving = self.serving or {}
        autoscaling = serving.get("autoscaling") or {}
        if (
            self.kind != "serving"
            or self.delete_requested
            or self.status.get("phase") in ("succeeded", "failed", "cancelled")
            or not autoscaling.get("enabled")
            or int(serving.get("max_replicas", 0)) < 1
        ):
            return None
        return str(serving.get("model", "")) or None


class DemandHold:
    """Holds requests for models at zero replicas; reports latencies for the autoscaler."""

    def __init__(
        self,
        etcd: EtcdStore,
        models: ModelDirectory,
        *,
        scheduler_address: str,
        hold_timeout_s: float = 60.0,
        refresh_s: float = 5.0,
        redis_client: Any | None = None,
        source: str = "gateway",
    ) -> None:
        self._models = models
        self._demand = demands(etcd)
        self._deployments: Informer[_DeploymentView] = Informer(
            TypedPrefix(etcd, Keys.jobs_prefix(), _DeploymentView, Keys.job)
        )
        self._scheduler_address = scheduler_address
        self._scheduler: scheduler_pb2_grpc.SchedulerServiceStub | None = None
        self._channel: Any | None = None
        self.hold_timeout_s = hold_timeout_s
        self.refresh_s = refresh_s
        self._redis = redis_client
        self._source = source
        self._waiting: dict[str, int] = {}
        self._written_at: dict[str, float] = {}
        self._marks: weakref.WeakKeyDictionary[Any, tuple[str, float, float]] = (
            weakref.WeakKeyDictionary()
        )
        self.held = 0
        self.released = 0
        self.expired = 0

    def start(self) -> None:
        self._deployments.start()

    async def stop(self) -> None:
        await self._deployments.stop()
        if self._channel is not None:
            await self._channel.close()

    def scales_from_zero(self, model: str) -> bool:
        return any(d.scalable_model() == model for d in self._deployments.items.values())

    # --- scale from zero -------------------------------------------------------------------

    async def hold(self, model: str, timeout_s: float | None = None) -> float:
        """Waits until `model` has a routable instance if it is at zero replicas and can scale;
        returns the seconds held (0 when nothing was held). Raises Unavailable on expiry."""
        if self._models.live_instances(model) or not self.scales_from_zero(model):
            return 0.0
        timeout = self.hold_timeout_s if timeout_s is None else timeout_s
        started = time.monotonic()
        deadline = started + timeout
        self.held += 1
        self._waiting[model] = self._waiting.get(model, 0) + 1
        try:
            while True:
                await self._signal(model)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                up = await self._models.instances.wait_for(
                    lambda items: any(i.model == model for i in items.values()),
                    min(remaining, self.refresh_s),
                )
                if up and await self._routable(model, deadline):
                    self.released += 1
                    return time.monotonic() - started
        finally:
            self._waiting[model] -= 1
            if self._waiting[model] <= 0:
                del self._waiting[model]
                await self._clear(model)
        self.expired += 1
        raise Unavailable(
            f"model {model!r} is scaling up from zero replicas and no instance came up "
            f"within {timeout:.0f}s; retry later"
        )

    async def _signal(self, model: str) -> None:
        """Writes (or refreshes) the demand record; at most once per `refresh_s` per model."""
        now = time.time()
        if now - self._written_at.get(model, 0.0) < self.refresh_s:
            return
        self._written_at[model] = now
        record = DemandRecord(
            model=model, waiting=self._waiting.get(model, 1), at=now, source=self._source
        )
        try:
            await self._demand.put(Keys.demand_entry(self._source, model), record)
        except DeepServeError as exc:
            log.warning("writing demand for %s failed: %s", model, exc)

    async def _clear(self, model: str) -> None:
        self._written_at.pop(model, None)
        with contextlib.suppress(DeepServeError):
            await self._demand.delete(Keys.demand_entry(self._source, model))

    async def _routable(self, model: str, deadline: float) -> bool:
        """Whether the scheduler routes to the model yet (its watch may trail ours a little)."""
        if self._scheduler is None:
            from deepserve.rpc.client import insecure_channel

            self._channel = insecure_channel(self._scheduler_address)
            self._scheduler = scheduler_pb2_grpc.SchedulerServiceStub(self._channel)
        while time.monotonic() < deadline:
            try:
                reply = await self._scheduler.ListInstances(
                    scheduler_pb2.ListInstancesRequest(model=model), timeout=2.0
                )
                if reply.instances:
                    return True
            except Exception as exc:  # the scheduler restarting: keep waiting for it
                log.debug("ListInstances failed: %s", exc)
            await asyncio.sleep(0.01)
        return False

    # --- latency reports -------------------------------------------------------------------

    def started(self, call: Any, opened_at: float) -> None:
        """The call's first token arrived now; `opened_at` is when the request came in."""
        self._marks[call] = (call.job.model, opened_at, time.monotonic())

    async def finished(self, call: Any) -> None:
        """Reports the call's TTFT and TPOT (a completed call only)."""
        marks = self._marks.pop(call, None)
        if marks is None or self._redis is None or not call.completed:
            return
        model, opened_at, first_at = marks
        tokens = call.usage().completion_tokens
        tpot = (time.monotonic() - first_at) / (tokens - 1) if tokens > 1 else 0.0
        try:
            await record_latency(self._redis, model, first_at - opened_at, tpot)
        except Exception as exc:  # Redis is lossy-tolerable
            log.debug("latency report failed: %s", exc)
