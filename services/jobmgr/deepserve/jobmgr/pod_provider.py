"""What the reconciler needs from the pod pool, as plain Python (the gRPC client implements it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from deepserve.records import PodPurpose, Role
from deepserve.scaling.timeline import ScaleTimeline


@dataclass(frozen=True, slots=True)
class PodAsk:
    """A task asking for a pod that serves its model in its role (or that trains on it)."""

    task_id: str
    job_id: str
    model: str
    role: Role
    tensor_parallel_size: int = 1
    purpose: PodPurpose = PodPurpose.SERVING


@dataclass(frozen=True, slots=True)
class PodGrant:
    """A pod that now serves the task: its instance is registered and routable."""

    pod_id: str
    address: str
    instance_id: str
    cold_start: bool
    claim_seconds: float
    load_seconds: float
    # The scale-up's five steps and their durations (empty from an older pool).
    timeline: ScaleTimeline = field(default_factory=ScaleTimeline)


class PodProvider(Protocol):
    """Hands out pods for tasks and takes them back."""

    async def acquire(self, ask: PodAsk) -> PodGrant: ...

    async def release(self, pod_id: str, *, terminate: bool = False) -> None: ...
