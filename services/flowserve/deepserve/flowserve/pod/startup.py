"""Model-agnostic engine start (scale-up step 2), done once when a pod starts warm.

Everything a model load would otherwise pay first — importing the engine, model, tokenizer and
transfer modules, probing the device, the allocator's first touch — happens here, before the pod
registers as warm, so LoadModel pays only for the model itself. Collective communicators are
model-specific (their world is the tensor-parallel size), so a tp > 1 load still starts them.
Tokenizers are model-specific too, but cheap to hold: those of the models likely to scale (the
pool's DRAM list, the copies in this host's weights cache) are loaded here as well.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from deepserve.flowserve.pod.scale_up import RuntimeWarmth
from deepserve.flowserve.settings import FlowServeSettings

log = logging.getLogger(__name__)


def process_age_s() -> float:
    """Seconds since this process started (Linux /proc; 0 where unknown)."""
    try:
        with open(f"/proc/{os.getpid()}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def prewarm_runtime(settings: FlowServeSettings) -> RuntimeWarmth:
    """Imports the engine, touches the device and loads the tokenizers of the models likely to
    come; runs in a worker thread of the shell, before the pod registers as warm."""
    import torch

    import deepserve.flowserve.disagg.endpoint
    import deepserve.flowserve.pod.engine_builder
    import deepserve.flowserve.pod.fork  # noqa: F401
    from deepserve.flowserve.runner.device import detect_platform

    if settings.threads > 0:
        from deepserve.flowserve.runner.cpu_threads import configure_intraop_threads

        configure_intraop_threads(settings.threads)
    device = detect_platform(settings.device or None).device()
    probe = torch.ones(16, device=device)
    (probe * 2).sum().item()  # first kernel launch and allocator use, off the load path
    try:
        preload_tokenizers(settings)
    except Exception:  # a preload is an optimisation: it never keeps a pod from starting
        log.exception("preloading tokenizers failed")
    premap_dram_copies(settings)
    return RuntimeWarmth(process_age_s(), time.time(), str(device))


def tokenizers_to_preload(settings: FlowServeSettings) -> list[Path]:
    """Model directories whose tokenizers a warm pod loads ahead: the configured models (those
    likely to scale) and the DRAM copies on this host."""
    from deepserve.models.catalog import default_cache_dir, resolve_model
    from deepserve.scaling.weights_cache import WeightsCacheLayout

    dirs: list[Path] = []
    for name in filter(None, (m.strip() for m in settings.preload_tokenizers.split(","))):
        try:
            dirs.append(Path(resolve_model(name, settings.model_cache_dir or default_cache_dir())))
        except Exception as exc:  # a hint only: a model that is not here is skipped
            log.warning("not preloading the tokenizer of %s: %s", name, exc)
    if settings.use_weights_cache:
        dirs.extend(
            entry.path for entry in WeightsCacheLayout(settings.weights_cache_dir).entries()
        )
    return list(dict.fromkeys(dirs))


def preload_tokenizers(settings: FlowServeSettings) -> list[Path]:
    """Loads the tokenizers `tokenizers_to_preload` names into the process-wide cache."""
    from deepserve.tokenizer.cache import shared_tokenizers

    started = time.monotonic()
    loaded = shared_tokenizers.preload(tokenizers_to_preload(settings))
    if loaded:
        log.info(
            "tokenizers preloaded",
            extra={
                "fields": {
                    "models": [p.name for p in loaded],
                    "seconds": round(time.monotonic() - started, 3),
                }
            },
        )
    return loaded


def premap_dram_copies(settings: FlowServeSettings) -> int:
    """Maps the rank files of this host's DRAM copies (tp 1, the engine's dtype) ahead of any
    LoadModel, within `premap_dram_copies_mb`; drops those gone. Returns how many it mapped."""
    if settings.premap_dram_copies_mb <= 0 or not settings.use_weights_cache:
        return 0
    from deepserve.flowserve.model.premapped import premapped
    from deepserve.flowserve.model.prepared_weights import dtype_name
    from deepserve.flowserve.pod.engine_builder import engine_dtype
    from deepserve.scaling.weights_cache import WeightsCacheLayout

    premapped.prune()
    dtype = dtype_name(engine_dtype(settings))
    mapped = 0
    budget = settings.premap_dram_copies_mb << 20
    for entry in WeightsCacheLayout(settings.weights_cache_dir).entries():
        if entry.tp_size != 1 or entry.dtype != dtype:
            continue
        try:
            mapped += premapped.premap(entry.rank_path(0), max_total_bytes=budget)
        except Exception:  # an optimisation: a copy being deleted right now is skipped
            log.warning("premapping %s failed", entry.path, exc_info=True)
    return mapped
