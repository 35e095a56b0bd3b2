"""Prometheus metrics of scale-ups: how long each of the paper's five steps took."""

from __future__ import annotations

from prometheus_client import Histogram

from deepserve.metrics import registry
from deepserve.scaling.timeline import ScaleTimeline

SCALEUP_STEP_SECONDS = Histogram(
    "deepserve_scaleup_step_seconds",
    "Duration of each scale-up step (pod_acquired ... visible), by where the weights came from",
    ["step", "weights_source"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
    registry=registry(),
)


def observe_scale_up(timeline: ScaleTimeline) -> None:
    source = timeline.weights_source.value or "unknown"
    for timing in timeline.steps:
        SCALEUP_STEP_SECONDS.labels(timing.step.value, source).observe(timing.seconds)
