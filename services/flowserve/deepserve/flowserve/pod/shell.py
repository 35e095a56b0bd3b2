"""The task-executor shell around one FlowServe engine (the paper's "TE shell").

A pod starts without a model: it registers as warm and waits. `load_model` builds the engine for
a model and role, registers the instance (visible to schedulers), and starts reporting load to
Redis and KV events to the global prefix index. `unload_model` returns the pod to warm.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

from deepserve.background import stop_task
from deepserve.errors import FailedPrecondition, InvalidArgument
from deepserve.flowserve.pod.registration import PodRegistration
from deepserve.flowserve.settings import FlowServeSettings
from deepserve.records import InstanceRecord, PodState, Role
from deepserve.store.etcd import EtcdStore
from deepserve.store.redis_messages import KVEventEntry, LoadReport
from deepserve.store.redis_store import RedisStore

log = logging.getLogger(__name__)


def end_this_process() -> None:
    """Ends the pod the way podpool would (SIGTERM: drain, then exit)."""
    log.warning("pod lease lost: ending this pod (it has been replaced)")
    os.kill(os.getpid(), signal.SIGTERM)


class TaskExecutorShell:
    """Owns the pod's registration and, once loaded, its engine and instance."""

    def __init__(self, settings: FlowServeSettings, etcd: EtcdStore, redis: RedisStore) -> None:
        self.settings = settings
        self.etcd = etcd
        self.redis = redis
        self.engine: Any | None = (
            None  # deepserve.flowserve.engine.async_engine.AsyncEngine once loaded
        )
        # deepserve.flowserve.disagg.endpoint.DisaggEndpoint once loaded (PD hand-off).
        self.disagg: Any | None = None
        self.tokenizer: Any | None = None
        self.model_name = ""
        self.role = Role.COLOCATED
        self.instance_id = ""
        self.pod: PodRegistration | None = None
        self.device = ""
        self._reporter: asyncio.Task[None] | None = None
        self._kv_events: list[KVEventEntry] = []
        self._load_lock = asyncio.Lock()
        # deepserve.flowserve.pod.scale_up.RuntimeWarmth: what the model-agnostic start took.
        self.warmth: Any | None = None
        # deepserve.scaling.ScaleTimeline of the last load (scale-up steps 2-5).
        self.last_timeline: Any | None = None
        # Set once start() registered the pod: a LoadModel that arrives earlier waits for it.
        self._started = asyncio.Event()
        self._premapper: asyncio.Task[None] | None = None
        # Explicit cached contexts being pinned here in the background, by id.
        self._pinning: dict[str, asyncio.Task[None]] = {}

    async def start(self, address: str) -> None:
        # Importing torch and probing the device here is what makes a pod "warm".
        from deepserve.flowserve.runner.device import detect_platform

        self.device = str(detect_platform(self.settings.device or None).device())
        from deepserve.flowserve.pod.startup import prewarm_runtime

        self.warmth = await asyncio.to_thread(prewarm_runtime, self.settings)
        self.pod = PodRegistration(
            self.etcd,
            self.settings.pod_id,
            address,
            self.settings.common.lease_ttl_s,
            self.device,
            host=self.settings.common.host_name,
            backend=self.settings.backend,
        )
        await self.pod.register()
        # A pod whose lease is gone (cut off from etcd past its TTL) has been replaced already:
        # it ends itself rather than serve unseen, and never registers a second copy.
        self.pod.on_lease_lost(end_this_process)
        self._started.set()
        if self.settings.premap_dram_copies_mb > 0 and self.settings.use_weights_cache:
            self._premapper = asyncio.create_task(self._premap_loop(), name="premap")

    async def _premap_loop(self) -> None:
        """While warm and idle, maps DRAM copies that appeared since the start (a pool fills
        its pods while podpool is still preparing the copies)."""
        from deepserve.flowserve.pod.startup import premap_dram_copies

        while True:
            await asyncio.sleep(self.settings.premap_interval_s)
            if self.engine is None and not self._load_lock.locked():
                try:
                    await asyncio.to_thread(premap_dram_copies, self.settings)
                except Exception:  # an optimisation: never takes the pod down
                    log.warning("premapping DRAM copies failed", exc_info=True)

    @property
    def ready(self) -> bool:
        return self.engine is not None

    def require_engine(self, model: str) -> Any:
        if self.engine is None:
            raise FailedPrecondition("this pod has no model loaded (call LoadModel first)")
        if model and model != self.model_name:
            raise InvalidArgument(
                f"this instance serves {self.model_name!r}, not {model!r}", field="model"
            )
        return self.engine

    async def load_model(
        self,
        model: str,
        role: Role,
        *,
        job_id: str = "",
        task_id: str = "",
        tp_size: int = 1,
        weights: Any | None = None,
    ) -> tuple[str, float]:
        """Loads `model` into this warm pod and registers the instance; returns (id, seconds)."""
        if not model:
            raise InvalidArgument("a model is required", field="model")
        await self._started.wait()
        async with self._load_lock:
            if self.engine is not None:
                if model == self.model_name:
                    return self.instance_id, 0.0
                raise FailedPrecondition(
                    f"pod already serves {self.model_name!r}; UnloadModel first"
                )
            assert self.pod is not None
            started = time.monotonic()
            model_dir = self._resolve(model)
            await self.pod.set_pod(state=PodState.ASSIGNED, model=model, role=role, task_id=task_id)
            from deepserve.flowserve.pod.engine_builder import build_engine
            from deepserve.flowserve.pod.scale_up import ModelLoadSteps
            from deepserve.scaling.timeline import ScaleStep

            # Scale-up steps 3-5 (weights from fork / DRAM / disk, warm-up, visible), timed.
            steps = ModelLoadSteps(self.settings, self.etcd, self.warmth)
            try:
                engine, tokenizer, max_model_len = await steps.load_engine(
                    model,
                    model_dir,
                    tp_size,
                    weights,
                    lambda d, s: build_engine(d, s, tp_size, self._on_kv_event),
                )
            except Exception:
                await self.pod.set_pod(state=PodState.WARM, model="", task_id="")
                raise
            try:
                await steps.warm_up(engine, model_dir)
            except Exception:
                await asyncio.to_thread(engine.shutdown)
                await self.pod.set_pod(state=PodState.WARM, model="", task_id="")
                raise
            from deepserve.flowserve.disagg.endpoint import DisaggEndpoint
            from deepserve.flowserve.transfer.settings import TransferSettings

            self.engine, self.tokenizer = engine, tokenizer
            # KV for a decode instance on another host is offered on this pod's own address.
            transfer = TransferSettings(tcp_bind_host=self.settings.common.host)
            self.disagg = DisaggEndpoint(engine, transfer)
            self.model_name, self.role = model, role
            self.instance_id = f"inst-{uuid.uuid4().hex[:10]}"
            with steps.step(ScaleStep.VISIBLE, "instance registered in etcd"):
                await self.pod.register_instance(
                    InstanceRecord(
                        instance_id=self.instance_id,
                        model=model,
                        role=role,
                        address=self.pod.pod.address,
                        pod_id=self.pod.pod.pod_id,
                        job_id=job_id,
                        task_id=task_id,
                        tensor_parallel_size=tp_size,
                        device=self.device,
                        max_model_len=max_model_len,
                        # The engine's own block size: routers hash prompts with it.
                        block_size=engine.config.block_size,
                    )
                )
            self.last_timeline = steps.timeline
            self._reporter = asyncio.create_task(self._report_load(), name="load-reporter")
            seconds = time.monotonic() - started
            log.info(
                "model loaded",
                extra={
                    "fields": {"model": model, "seconds": round(seconds, 3), "role": role.value}
                },
            )
            return self.instance_id, seconds

    def require_disagg(self, model: str) -> Any:
        """The loaded engine's PD hand-off endpoint (raises like require_engine)."""
        self.require_engine(model)
        assert self.disagg is not None
        return self.disagg

    def _resolve(self, model: str) -> Path:
        from deepserve.models.catalog import default_cache_dir, resolve_model

        try:
            return resolve_model(model, self.settings.model_cache_dir or default_cache_dir())
        except Exception as exc:
            raise InvalidArgument(str(exc), field="model") from exc

    async def unload_model(self) -> None:
        async with self._load_lock:
            if self.engine is None:
                if self.pod is not None:
                    # Claimed without a model (a training task): the pool's claim marked the
                    # record assigned; hand it back as warm.
                    await self.pod.set_pod(state=PodState.WARM, model="", task_id="")
                return
            assert self.pod is not None
            await self.pod.deregister_instance()  # stop new routing first
            await self._stop_reporter()
            engine, self.engine = self.engine, None
            await self._close_disagg()
            await asyncio.to_thread(engine.shutdown)
            self.model_name, self.instance_id = "", ""
            await self.pod.set_pod(state=PodState.WARM, model="", task_id="")

    def _on_kv_event(self, event: Any) -> None:
        # Called from the engine thread (event: a flowserve.kv_cache.events.KVEvent);
        # list.append is atomic under the GIL.
        self._kv_events.append(
            KVEventEntry(
                kind=event.kind, tier=event.tier, hashes=tuple(event.hex_hashes), at=time.time()
            )
        )

    def keep_context_pinned(
        self, context_id: str, token_ids: list[int], *, salt: str, expires_at: float
    ) -> None:
        """A request named an explicit cached context this instance may not hold yet (it was
        routed elsewhere, or this instance restarted): pin it, in the background, from the KV
        the request just computed (or the host tier), until its expiry."""
        engine = self.engine
        if engine is None or context_id in self._pinning:
            return
        if expires_at and expires_at <= time.time():
            return

        async def pin() -> None:
            try:
                held = {p.context_id for p in await engine.pinned_contexts()}
                if context_id not in held:
                    await engine.pin_context(
                        context_id, token_ids, salt=salt, expires_at=expires_at
                    )
            except Exception as exc:  # a lost pin costs a recompute later, nothing more
                log.warning("pinning context %s failed: %s", context_id, exc)
            finally:
                self._pinning.pop(context_id, None)

        self._pinning[context_id] = asyncio.create_task(pin(), name=f"pin-{context_id}")

    async def publish_state(self) -> None:
        """Publishes the engine's load report and the KV events since the last call to Redis."""
        if self.engine is None:
            return
        # Explicit cached contexts past their expiry are unpinned here (the instance is the
        # one holder of its pins); the rest are reported, so schedulers route to them.
        await self.engine.unpin_expired(time.time())
        pinned = await self.engine.pinned_contexts()
        stats = self.engine.stats()
        report = LoadReport(
            at=time.time(),
            model=self.model_name,
            running=stats.num_running,
            waiting=stats.num_waiting,
            kv_blocks_used=stats.kv_blocks_used,
            kv_blocks_total=stats.kv_blocks_total,
            prefix_cache_hit_rate=stats.prefix_cache_hit_rate,
            tokens_per_s=stats.generation_tokens_per_s,
            pinned_contexts=tuple(p.context_id for p in pinned),
            adapters=tuple(self.engine.held_adapters()),
        )
        ttl_s = max(3 * self.settings.load_report_interval_s, 2)
        await self.redis.publish_load(self.instance_id, report, ttl_s=ttl_s)
        events, self._kv_events = self._kv_events, []
        await self.redis.append_kv_events(self.instance_id, events)

    async def _report_load(self) -> None:
        interval = self.settings.load_report_interval_s
        while True:
            try:
                await self.publish_state()
                if self.disagg is not None:
                    # KV segments a decode peer never claimed (it died or went away).
                    self.disagg.shared_memory.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis is lossy-tolerable: log and keep serving
                log.warning("load report failed: %s", exc)
            await asyncio.sleep(interval)

    async def _stop_reporter(self) -> None:
        reporter, self._reporter = self._reporter, None
        if reporter is not None:
            await stop_task(reporter)

    async def close(self) -> None:
        if self._premapper is not None:
            await stop_task(self._premapper)
        await self._stop_reporter()
        if self.pod is not None:
            await self.pod.close()
        await self._close_disagg()
        if self.engine is not None:
            engine, self.engine = self.engine, None
            await asyncio.to_thread(engine.shutdown)

    async def _close_disagg(self) -> None:
        disagg, self.disagg = self.disagg, None
        if disagg is not None:
            await disagg.close()
