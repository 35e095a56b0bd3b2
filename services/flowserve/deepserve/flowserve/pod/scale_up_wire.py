"""LoadModel's weights plan and scale-up timeline <-> protobuf (the FlowServeService edge)."""

from __future__ import annotations

from typing import Any

from deepserve.scaling.weights_plan import WeightsPlan
from deepserve.scaling.wire import (
    steps_to_proto,
    weights_source_from_proto,
    weights_source_to_proto,
)
from deepserve.v1 import flowserve_pb2


def weights_plan_from_proto(request: flowserve_pb2.LoadModelRequest) -> WeightsPlan:
    return WeightsPlan(
        source=weights_source_from_proto(request.weights_source),
        path=request.weights_path,
        fork_from=request.fork_from,
    )


def load_model_reply(
    instance_id: str, seconds: float, timeline: Any | None
) -> flowserve_pb2.LoadModelResponse:
    """The reply with the pod's scale-up steps (none when the model was already loaded)."""
    reply = flowserve_pb2.LoadModelResponse(instance_id=instance_id, load_seconds=seconds)
    if timeline is not None and seconds > 0:
        reply.steps.extend(steps_to_proto(timeline))
        reply.weights_source = weights_source_to_proto(timeline.weights_source)
    return reply
