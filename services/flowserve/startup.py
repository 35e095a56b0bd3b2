"""Model-agnostic engine start (scale-up step 2), done once when a pod starts warm.

Everything a model load would otherwise pay first — importing the engine, model, tokenizer and
transfer modules, probing the device, the allocator's first touch — happens here, before the pod
registers as warm, so LoadModel pays only for the model itself. Collective communicators are
model-specific (their world is the tensor-parallel size), so a tp > 1 load still starts them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from deepserve.config import FlowServeSettings


@dataclass(frozen=True, slots=True)
class RuntimeWarmth:
    """What the pod did before any model: how long it took and when it was done."""

    # From the process's start to the runtime being ready (imports, device).
    started_in_s: float
    ready_at: float
    device: str


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
    """Imports the engine and touches the device; runs in a worker thread of the shell."""
    import torch

    import deepserve.flowserve.disagg.endpoint
    import deepserve.flowserve.engine_builder
    import deepserve.flowserve.fork
    import deepserve.flowserve.scale_up  # noqa: F401
    from deepserve.flowserve.device import detect_platform

    device = detect_platform(settings.device or None).device()
    probe = torch.ones(16, device=device)
    (probe * 2).sum().item()  # first kernel launch and allocator use, off the load path
    return RuntimeWarmth(process_age_s(), time.time(), str(device))
