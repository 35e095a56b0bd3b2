"""The five steps of a scale-up (paper section 4) and how long each took.

    1 pod_acquired    scaler-pre: a pod is claimed from the warm pool (or started cold)
    2 engine_started  TE pre-load: imports, device, communicator; no model yet
    3 weights_loaded  TE load: weights from disk, a DRAM copy, or a running instance (fork)
    4 warmed_up       TE post-load: KV cache sized (profiled once), one dummy request run
    5 visible         scaler-post: the instance registered in etcd, pushed to the schedulers

The pod measures steps 2-5 and the pool step 1; the task record in etcd keeps them all.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field


class ScaleStep(StrEnum):
    POD_ACQUIRED = "pod_acquired"
    ENGINE_STARTED = "engine_started"
    WEIGHTS_LOADED = "weights_loaded"
    WARMED_UP = "warmed_up"
    VISIBLE = "visible"


STEP_ORDER: tuple[ScaleStep, ...] = tuple(ScaleStep)


class WeightsSource(StrEnum):
    """Where a new instance's weights came from."""

    UNSPECIFIED = ""
    DISK = "disk"
    DRAM = "dram"
    FORK = "fork"


class StepTiming(BaseModel):
    """One step's duration and how it was done."""

    step: ScaleStep
    seconds: float
    detail: str = ""


class ScaleTimeline(BaseModel):
    """The steps of one scale-up, in order; a step appears at most once."""

    steps: list[StepTiming] = Field(default_factory=list)
    weights_source: WeightsSource = WeightsSource.UNSPECIFIED

    def record(self, step: ScaleStep, seconds: float, detail: str = "") -> None:
        """Sets a step's timing (replacing an earlier one) and keeps the paper's order."""
        kept = [s for s in self.steps if s.step != step]
        kept.append(StepTiming(step=step, seconds=max(0.0, seconds), detail=detail))
        self.steps = sorted(kept, key=lambda s: STEP_ORDER.index(s.step))

    def merge(self, other: ScaleTimeline) -> None:
        for timing in other.steps:
            self.record(timing.step, timing.seconds, timing.detail)
        if other.weights_source != WeightsSource.UNSPECIFIED:
            self.weights_source = other.weights_source

    def seconds(self, step: ScaleStep) -> float | None:
        for timing in self.steps:
            if timing.step == step:
                return timing.seconds
        return None

    @property
    def total_seconds(self) -> float:
        return sum(s.seconds for s in self.steps)

    def summary(self) -> str:
        """One line, e.g. `pod_acquired 0.01s, weights_loaded 0.20s (dram), ... = 0.40s`."""
        parts = [f"{s.step.value} {s.seconds:.2f}s" for s in self.steps]
        source = f" [weights: {self.weights_source.value}]" if self.weights_source else ""
        return f"{', '.join(parts)} = {self.total_seconds:.2f}s{source}"
