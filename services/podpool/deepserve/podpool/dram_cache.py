"""DRAM pre-loading: keep the weights of models likely to scale in this host's shared memory.

The models kept are the configured ones (pinned) plus the `recent` most recently scaled-up ones;
copies beyond that, or beyond the byte budget, are evicted least recently used first. A copy is
prepared by a short-lived `python -m deepserve.flowserve.model.prepared_weights` subprocess (one at a
time, single-threaded), so the pool's own process never imports torch or holds weights. Pods
map the copies (`deepserve.flowserve.model.prepared_weights`); a fork target's received weights land in
the same cache and count as a copy too. Removing a copy never disturbs instances mapping it:
their pages live until they unmap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deepserve.background import stop_tasks
from deepserve.errors import DeepServeError
from deepserve.processes import bound_to_parent
from deepserve.scaling.weights_cache import WeightsCacheLayout, WeightsEntry

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DramCopyInfo:
    """A copy as ListPods shows it."""

    model: str
    path: str
    nbytes: int
    pinned: bool
    ready: bool


class DramPreloader:
    """Prepares, tracks and evicts the host's DRAM copies of model weights."""

    def __init__(
        self,
        layout: WeightsCacheLayout,
        resolve: Callable[[str], Path],
        *,
        pinned: list[str],
        recent: int = 2,
        budget_bytes: int = 0,
        device: str = "",
        prepare_timeout_s: float = 600.0,
        fork_copy_keep_s: float = 600.0,
        dtype: str = "",
    ) -> None:
        self.layout = layout
        # A copy a fork left (an instance of the model was just scaled up here) is kept this
        # long even when unwanted, so the next instance maps it instead of forking again.
        self.fork_copy_keep_s = fork_copy_keep_s
        self._resolve = resolve
        self.pinned = list(dict.fromkeys(m for m in pinned if m))
        self.recent = recent
        self.budget_bytes = budget_bytes
        self.device = device
        # The copies' dtype; empty: the device's default (a node agent without the pods'
        # accelerator names theirs, e.g. bfloat16).
        self.dtype = dtype
        self.prepare_timeout_s = prepare_timeout_s
        # model -> last time a scale-up asked for it (monotonic), most recent last.
        self._demand: dict[tuple[str, int], float] = {}
        self._preparing: dict[tuple[str, int], asyncio.Task[WeightsEntry | None]] = {}
        self._one_at_a_time = asyncio.Semaphore(1)
        self.prepared = 0
        self.evicted = 0

    # --- queries ---------------------------------------------------------------------------

    def find(self, model: str, tp_size: int = 1) -> WeightsEntry | None:
        """The host's complete copy of `model`, if any (any dtype; the pod checks its own)."""
        try:
            model_dir = self._resolve(model)
        except DeepServeError:
            return None
        return self.layout.find_any(model_dir, tp_size)

    def copies(self) -> list[DramCopyInfo]:
        pinned_dirs = {str(d) for d in self._dirs(self.pinned)}
        ready = [
            DramCopyInfo(e.model, str(e.path), e.nbytes, e.source_dir in pinned_dirs, True)
            for e in self.layout.entries()
        ]
        busy = [
            DramCopyInfo(model, "", 0, model in self.pinned, False)
            for (model, _), task in self._preparing.items()
            if not task.done()
        ]
        return ready + busy

    def preparing(self, model: str, tp_size: int = 1) -> asyncio.Task[WeightsEntry | None] | None:
        task = self._preparing.get((model, tp_size))
        return task if task is not None and not task.done() else None

    # --- policy ----------------------------------------------------------------------------

    def note_demand(self, model: str, tp_size: int = 1) -> None:
        """A scale-up of `model` happened: keep (or make) its copy and maybe evict another."""
        key = (model, tp_size)
        self._demand.pop(key, None)
        self._demand[key] = time.monotonic()
        if self.recent > 0 or model in self.pinned:
            self.ensure(model, tp_size)

    def ensure(self, model: str, tp_size: int = 1) -> asyncio.Task[WeightsEntry | None] | None:
        """Starts preparing the copy in the background unless it exists or is being made."""
        key = (model, tp_size)
        if self.find(model, tp_size) is not None:
            return None
        running = self.preparing(model, tp_size)
        if running is not None:
            return running
        task = asyncio.create_task(self._prepare(model, tp_size), name=f"dram-prepare:{model}")
        self._preparing[key] = task
        return task

    async def reconcile(self) -> None:
        """Pinned copies exist; unwanted and over-budget copies go (least recently used first)."""
        self.layout.sweep_staging()
        for model in self.pinned:
            self.ensure(model)
        wanted = {str(d) for d in self._dirs(self.pinned)}
        recent = [model for (model, _) in reversed(self._demand)][: self.recent]
        wanted |= {str(d) for d in self._dirs(recent)}
        ranked = sorted(self.layout.entries(), key=self._last_use)
        now = time.time()
        for entry in ranked:
            fresh_fork = entry.origin == "fork" and now - entry.created_at < self.fork_copy_keep_s
            if entry.source_dir not in wanted and not fresh_fork:
                self._evict(entry, "not pinned and not recently used")
        if self.budget_bytes > 0:
            kept = [e for e in sorted(self.layout.entries(), key=self._last_use)]
            total = sum(e.nbytes for e in kept)
            pinned_dirs = {str(d) for d in self._dirs(self.pinned)}
            for entry in kept:
                if total <= self.budget_bytes:
                    break
                if entry.source_dir in pinned_dirs:
                    continue
                self._evict(entry, "over the DRAM budget")
                total -= entry.nbytes

    async def run(self, interval_s: float = 5.0) -> None:
        while True:
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("DRAM cache pass failed")
            await asyncio.sleep(interval_s)

    async def close(self) -> None:
        # A copy: each task removes itself from _preparing as it ends.
        await stop_tasks(list(self._preparing.values()))

    # --- internals -------------------------------------------------------------------------

    def _dirs(self, models: list[str]) -> list[Path]:
        dirs = []
        for model in models:
            with contextlib.suppress(DeepServeError):
                dirs.append(self._resolve(model).resolve())
        return dirs

    def _last_use(self, entry: WeightsEntry) -> float:
        uses = [
            at
            for (model, _), at in self._demand.items()
            for d in self._dirs([model])
            if str(d) == entry.source_dir
        ]
        return max(uses, default=0.0)

    def _evict(self, entry: WeightsEntry, why: str) -> None:
        self.layout.remove(entry)
        self.evicted += 1
        log.info("DRAM copy evicted", extra={"fields": {"model": entry.model, "why": why}})

    async def _prepare(self, model: str, tp_size: int) -> WeightsEntry | None:
        try:
            async with self._one_at_a_time:
                if (found := self.find(model, tp_size)) is not None:
                    return found
                model_dir = self._resolve(model)
                started = time.monotonic()
                # A helper: it dies with podpool.
                proc = await asyncio.create_subprocess_exec(*bound_to_parent([
                    sys.executable, "-m", "deepserve.flowserve.model.prepared_weights",
                    "--model", model, "--model-dir", str(model_dir),
                    "--root", str(self.layout.root), "--device", self.device,
                    "--tp-size", str(tp_size),
                    *(["--dtype", self.dtype] if self.dtype else []),
                ]), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)  # fmt: skip
                try:
                    out, err = await asyncio.wait_for(proc.communicate(), self.prepare_timeout_s)
                except BaseException:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
                    raise
                if proc.returncode != 0:
                    log.warning(
                        "DRAM copy failed",
                        extra={"fields": {"model": model, "stderr": err.decode()[-2000:]}},
                    )
                    return None
                result = json.loads(out.decode().strip().splitlines()[-1])
                self.prepared += 1
                log.info(
                    "DRAM copy ready",
                    extra={
                        "fields": {
                            "model": model,
                            "bytes": result["nbytes"],
                            "seconds": round(time.monotonic() - started, 2),
                        }
                    },
                )
                return self.find(model, tp_size)
        except (DeepServeError, OSError, ValueError, KeyError) as exc:
            log.warning("DRAM copy of %s failed: %s", model, exc)
            return None
        finally:
            self._preparing.pop((model, tp_size), None)


def make_preloader(
    cache_dir: Path, models: str, *, recent: int, budget_mb: int, device: str, dtype: str = ""
) -> DramPreloader:
    """A preloader of `models` (comma-separated, always kept) plus `recent` recently scaled-up
    ones, within `budget_mb` (0: no bound), in the weights cache at `cache_dir`."""
    return DramPreloader(
        WeightsCacheLayout(cache_dir),
        ModelResolver(),
        pinned=[m.strip() for m in models.split(",") if m.strip()],
        recent=recent,
        budget_bytes=budget_mb * 1024 * 1024,
        device=device,
        dtype=dtype,
    )


class ModelResolver:
    """Model name or path -> its directory on this host (raises NotFound)."""

    def __init__(self, cache_dir: Path | None = None) -> None:
        self._cache_dir = cache_dir

    def __call__(self, model: str) -> Path:
        from deepserve.models.catalog import default_cache_dir, resolve_model

        return resolve_model(model, self._cache_dir or default_cache_dir())
