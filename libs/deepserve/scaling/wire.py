"""Scale-up timelines and weight sources <-> their protobuf messages."""

from __future__ import annotations

from collections.abc import Iterable

from deepserve.scaling.timeline import ScaleStep, ScaleTimeline, WeightsSource
from deepserve.v1 import common_pb2

_SOURCE_TO_PROTO = {
    WeightsSource.UNSPECIFIED: common_pb2.WEIGHTS_SOURCE_UNSPECIFIED,
    WeightsSource.DISK: common_pb2.WEIGHTS_SOURCE_DISK,
    WeightsSource.DRAM: common_pb2.WEIGHTS_SOURCE_DRAM,
    WeightsSource.FORK: common_pb2.WEIGHTS_SOURCE_FORK,
}
_SOURCE_FROM_PROTO = {v: k for k, v in _SOURCE_TO_PROTO.items()}


def weights_source_to_proto(source: WeightsSource) -> int:
    return _SOURCE_TO_PROTO[source]


def weights_source_from_proto(value: int) -> WeightsSource:
    return _SOURCE_FROM_PROTO.get(value, WeightsSource.UNSPECIFIED)


def steps_to_proto(timeline: ScaleTimeline) -> list[common_pb2.ScaleStepTiming]:
    return [
        common_pb2.ScaleStepTiming(step=s.step.value, seconds=s.seconds, detail=s.detail)
        for s in timeline.steps
    ]


def timeline_from_proto(
    steps: Iterable[common_pb2.ScaleStepTiming], source: int = 0
) -> ScaleTimeline:
    """Unknown step names (a newer peer) are skipped rather than failing the scale-up."""
    timeline = ScaleTimeline(weights_source=weights_source_from_proto(source))
    known = {s.value for s in ScaleStep}
    for msg in steps:
        if msg.step in known:
            timeline.record(ScaleStep(msg.step), msg.seconds, msg.detail)
    return timeline
