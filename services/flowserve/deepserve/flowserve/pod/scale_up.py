"""Scale-up steps 2-5 inside a pod: weights from the best source, KV sizing, warm-up, timings.

`ModelLoadSteps` runs around the shell's engine build. It picks where the weights come from
(a fork from a running instance when podpool names one, a DRAM copy on this host, else the
disk), sizes the KV cache from the (model, device) profile in etcd (profiling and storing it
the first time), runs one dummy request, and records each step's duration both on a
`ScaleTimeline` (returned to podpool, kept on the task) and as a trace span.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from opentelemetry import trace

from deepserve.errors import DeepServeError
from deepserve.flowserve.settings import FlowServeSettings
from deepserve.scaling.kv_profile import KVProfile, KVProfileStore
from deepserve.scaling.timeline import ScaleStep, ScaleTimeline, WeightsSource
from deepserve.scaling.weights_cache import WeightsCacheLayout, WeightsEntry, read_entry
from deepserve.scaling.weights_plan import WeightsPlan
from deepserve.store.etcd import EtcdStore

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RuntimeWarmth:
    """Step 2, done before any model (see pod.startup): how long it took and when it was done."""

    # From the process's start to the runtime being ready (imports, device).
    started_in_s: float
    ready_at: float
    device: str


class ModelLoadSteps:
    """Times and performs one model load's steps 2-5 (see the module docstring)."""

    def __init__(
        self, settings: FlowServeSettings, etcd: EtcdStore, warmth: RuntimeWarmth | None
    ) -> None:
        self.settings = settings
        self.etcd = etcd
        self.layout = WeightsCacheLayout(settings.weights_cache_dir)
        self.timeline = ScaleTimeline()
        # Set by the load: whether the KV cache had to be profiled now (a first load here).
        self.kv_profiled_now = False
        if warmth is not None:
            before = max(0.0, time.time() - warmth.ready_at)
            detail = f"runtime ready on {warmth.device} {before:.1f}s before the load"
            self.timeline.record(ScaleStep.ENGINE_STARTED, warmth.started_in_s, detail)
            # Step 2 ran when the pod was pre-warmed, before this scale-up began: recorded in
            # the scale-up's trace with its real (earlier) times.
            ready_ns = int(warmth.ready_at * 1e9)
            span = tracer.start_span(
                f"scale_up.{ScaleStep.ENGINE_STARTED.value}",
                start_time=ready_ns - int(warmth.started_in_s * 1e9),
                attributes={
                    "deepserve.scale_step": ScaleStep.ENGINE_STARTED.value,
                    "deepserve.detail": detail,
                },
            )
            span.end(end_time=ready_ns)

    @contextlib.contextmanager
    def step(self, step: ScaleStep, detail: str = "") -> Iterator[dict[str, str]]:
        """Times the block as `step`; the yielded dict's "detail" may be set inside it."""
        note = {"detail": detail}
        started = time.monotonic()
        with tracer.start_as_current_span(f"scale_up.{step.value}") as span:
            yield note
            span.set_attribute("deepserve.scale_step", step.value)
            span.set_attribute("deepserve.detail", note["detail"])
        self.timeline.record(step, time.monotonic() - started, note["detail"])

    # --- step 3: weights ---------------------------------------------------------------------

    async def load_engine(
        self,
        model: str,
        model_dir: Path,
        tp_size: int,
        plan: WeightsPlan | None,
        build: Callable[[Path, FlowServeSettings], T],
    ) -> T:
        """Fetches the weights, sizes the KV cache, and runs `build(weights dir, settings)`."""
        with self.step(ScaleStep.WEIGHTS_LOADED) as note:
            weights_dir, source, how = await self._weights_dir(
                model, model_dir, tp_size, plan or WeightsPlan()
            )
            settings, kv = await self._kv_settings(model, model_dir, tp_size)
            from deepserve.tokenizer.cache import shared_tokenizers

            tokenizer = "preloaded" if shared_tokenizers.contains(weights_dir) else "loaded now"
            built = await asyncio.to_thread(build, weights_dir, settings)
            note["detail"] = f"{how}; {kv}; tokenizer {tokenizer}"
        self.timeline.weights_source = source
        return built

    def _dtype(self) -> Any:
        from deepserve.flowserve.pod.engine_builder import engine_dtype

        return engine_dtype(self.settings)

    def _usable(self, entry: WeightsEntry | None, tp_size: int) -> bool:
        from deepserve.flowserve.model.prepared_weights import dtype_name

        return (
            entry is not None
            and entry.tp_size == tp_size
            and entry.dtype == dtype_name(self._dtype())
        )

    async def _weights_dir(
        self, model: str, model_dir: Path, tp_size: int, plan: WeightsPlan
    ) -> tuple[Path, WeightsSource, str]:
        from deepserve.flowserve.model.prepared_weights import dtype_name

        dtype = self._dtype()
        notes: list[str] = []
        if plan.source == WeightsSource.DISK:
            return model_dir, WeightsSource.DISK, "disk (asked for)"
        if plan.source == WeightsSource.DRAM and plan.path:
            entry = read_entry(Path(plan.path))
            if self._usable(entry, tp_size):
                assert entry is not None
                return entry.path, WeightsSource.DRAM, f"DRAM copy {entry.path.name}"
            notes.append(f"DRAM copy {plan.path} unusable")
        # A copy on this host beats a fork (another instance here may have just made one).
        if self.settings.use_weights_cache or plan.source == WeightsSource.DRAM:
            local = self.layout.find(model_dir, dtype_name(dtype), tp_size)
            if local is not None:
                return local.path, WeightsSource.DRAM, f"DRAM copy {local.path.name}"
        if plan.source == WeightsSource.FORK and plan.fork_from:
            if tp_size != 1:
                notes.append("fork needs tp 1")
            else:
                from deepserve.flowserve.pod.fork import receive_weights

                try:
                    forked = await receive_weights(
                        plan.fork_from,
                        model=model,
                        model_dir=model_dir,
                        layout=self.layout,
                        dtype=dtype,
                        timeout_s=self.settings.fork_timeout_s,
                        shared_memory=self.settings.fork_shared_memory,
                        bulk_tcp=self.settings.fork_bulk_tcp,
                    )
                except DeepServeError as exc:
                    log.warning("fork from %s failed (%s); reading the disk", plan.fork_from, exc)
                    notes.append(f"fork from {plan.fork_from} failed: {exc}")
                else:
                    rate = forked.nbytes / max(forked.seconds, 1e-6) / 1e9
                    how = (
                        f"fork from {plan.fork_from} via {forked.via} "
                        f"({forked.nbytes / 1e6:.0f} MB in {forked.seconds:.2f}s, {rate:.2f} GB/s)"
                    )
                    return forked.entry.path, WeightsSource.FORK, how
        how = "disk" + (f" ({'; '.join(notes)})" if notes else "")
        return model_dir, WeightsSource.DISK, how

    # --- step 4 (sizing part): KV capacity, profiled once per (model, device) ------------------

    async def _kv_settings(
        self, model: str, model_dir: Path, tp_size: int
    ) -> tuple[FlowServeSettings, str]:
        settings = self.settings
        if settings.kv_cache_blocks > 0:
            return settings, f"KV blocks {settings.kv_cache_blocks} (configured)"
        from deepserve.flowserve.model.config import ModelConfig
        from deepserve.flowserve.model.prepared_weights import dtype_name
        from deepserve.flowserve.pod.engine_builder import engine_dtype, kv_blocks_for
        from deepserve.flowserve.runner.device import detect_platform

        platform = detect_platform(settings.device or None)
        device = platform.kind
        dtype = dtype_name(engine_dtype(settings))
        profiles = KVProfileStore(self.etcd)
        try:
            profile = await profiles.get(
                model, device, tp_size=tp_size, block_size=settings.block_size
            )
        except DeepServeError as exc:  # the profile is an optimisation: never fail a load on it
            log.warning("reading the KV profile failed: %s", exc)
            profile = None
        if (
            profile is not None
            and profile.memory_mb == settings.kv_cache_memory_mb
            and profile.dtype == dtype
        ):
            blocks, how = profile.num_blocks, "profiled earlier"
        else:
            config = ModelConfig.from_model_dir(model_dir)
            blocks = kv_blocks_for(settings, config, tp_size)
            how = "profiled now"
            self.kv_profiled_now = True
            with contextlib.suppress(DeepServeError):
                await profiles.put(
                    KVProfile(
                        model=model,
                        device=device,
                        tp_size=tp_size,
                        block_size=settings.block_size,
                        num_blocks=blocks,
                        dtype=dtype,
                        memory_mb=settings.kv_cache_memory_mb,
                    )
                )
        return settings.model_copy(
            update={"kv_cache_blocks": blocks}
        ), f"KV blocks {blocks} ({how})"

    # --- step 4: warm-up -----------------------------------------------------------------------

    def warmup_redundant(self) -> bool:
        """A DRAM copy (prepared and run on this host before) and a KV size known without
        profiling: the dummy request would prove nothing new."""
        return (
            self.settings.warmup_skip_on_dram
            and self.timeline.weights_source == WeightsSource.DRAM
            and not self.kv_profiled_now
        )

    async def warm_up(self, engine: Any, model_dir: Path) -> None:
        """One dummy request through the whole engine before the instance is routable."""
        with self.step(ScaleStep.WARMED_UP, "skipped") as note:
            if not self.settings.warmup_request:
                return
            if self.warmup_redundant():
                note["detail"] = "skipped: DRAM copy and a stored KV profile"
                return
            from deepserve.flowserve.model.config import ModelConfig
            from deepserve.sampling_params import SamplingParams

            token_id = ModelConfig.from_model_dir(model_dir).bos_token_id or 0
            params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
            async for _ in engine.generate(f"warmup-{uuid.uuid4().hex[:8]}", [token_id], params):
                pass
            note["detail"] = "one dummy request"
