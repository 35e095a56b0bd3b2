"""SchedulerService: translates the wire types around the domain Router and predictor."""

from __future__ import annotations

import grpc
from opentelemetry import trace

from deepserve.errors import InvalidArgument
from deepserve.scheduler.history_sync import HistorySync
from deepserve.scheduler.instance_table import InstanceTable
from deepserve.scheduler.route_metrics import ROUTE_DECISIONS
from deepserve.scheduler.router import RouteDecision, RouteFacts, Router
from deepserve.scheduler.suspects import SuspectInstances
from deepserve.v1 import scheduler_pb2, scheduler_pb2_grpc
from deepserve.wire import instance_to_proto

_tracer = trace.get_tracer(__name__)

_BRANCHES = {
    "locality": scheduler_pb2.ROUTE_BRANCH_LOCALITY,
    "load": scheduler_pb2.ROUTE_BRANCH_LOAD,
    "round_robin": scheduler_pb2.ROUTE_BRANCH_ROUND_ROBIN,
    "random": scheduler_pb2.ROUTE_BRANCH_RANDOM,
    "any": scheduler_pb2.ROUTE_BRANCH_ANY,
    "adapter": scheduler_pb2.ROUTE_BRANCH_ADAPTER,
}


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(
        self,
        router: Router,
        table: InstanceTable,
        history: HistorySync | None = None,
        suspects: SuspectInstances | None = None,
    ) -> None:
        self._router = router
        self._table = table
        self._history = history
        self._suspects = suspects

    async def Route(
        self, request: scheduler_pb2.RouteRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.RouteResponse:
        with _tracer.start_as_current_span("route") as span:
            decision = self._route(request)
            span.set_attribute("request_id", request.request_id)
            span.set_attribute("model", request.model)
            span.set_attribute("route.policy", decision.policy)
            span.set_attribute("route.branch", decision.branch)
            span.set_attribute("route.reason", decision.reason)
            span.set_attribute("route.disaggregated", decision.disaggregated)
            span.set_attribute("route.instances", [i.instance_id for i in decision.instances])
            for instance_id, score in list(decision.scores.items())[:8]:
                span.set_attribute(f"route.score.{instance_id}", score)
        ROUTE_DECISIONS.labels(
            request.model, decision.policy, decision.branch, str(decision.disaggregated).lower()
        ).inc()
        return scheduler_pb2.RouteResponse(
            instances=[instance_to_proto(i) for i in decision.instances],
            disaggregated=decision.disaggregated,
            branch=_BRANCHES.get(decision.branch, scheduler_pb2.ROUTE_BRANCH_UNSPECIFIED),
            reason=decision.reason,
            scores=decision.scores,
            predicted_decode_tokens=decision.predicted_decode_tokens,
            policy=decision.policy,
            pd_reason=decision.pd_reason,
        )

    def _route(self, request: scheduler_pb2.RouteRequest) -> RouteDecision:
        return self._router.route(
            RouteFacts(
                request_id=request.request_id,
                model=request.model,
                tenant=request.tenant,
                prompt_tokens=request.prompt_tokens,
                max_tokens=request.max_tokens,
                prefix_block_hashes=list(request.prefix_block_hashes),
                block_size=request.block_size,
                exclude_instance_ids=set(request.exclude_instance_ids),
                cached_context_id=request.cached_context_id,
                adapter=request.adapter,
            )
        )

    async def ListInstances(
        self, request: scheduler_pb2.ListInstancesRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ListInstancesResponse:
        chosen = self._table.of_model(request.model) if request.model else self._table.all()
        return scheduler_pb2.ListInstancesResponse(
            instances=[instance_to_proto(i) for i in chosen],
            instances_added=self._table.added,
            instances_removed=self._table.removed,
        )

    async def ReportCompletion(
        self, request: scheduler_pb2.ReportCompletionRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ReportCompletionResponse:
        if not request.model:
            raise InvalidArgument("model is required", field="model")
        if request.completion_tokens < 0:
            raise InvalidArgument("must be >= 0", field="completion_tokens")
        predictor = self._router.predictor
        prediction, correct = predictor.observe(
            request.model, request.tenant, request.completion_tokens, request.max_tokens
        )
        if self._history is not None:
            bucket = predictor.bucket_of(request.completion_tokens)
            self._history.observed(request.model, request.tenant, bucket)
        return scheduler_pb2.ReportCompletionResponse(
            predicted_decode_tokens=prediction.tokens, correct=correct
        )

    async def ReportInstanceFailure(
        self,
        request: scheduler_pb2.ReportInstanceFailureRequest,
        context: grpc.aio.ServicerContext,
    ) -> scheduler_pb2.ReportInstanceFailureResponse:
        if not request.instance_id:
            raise InvalidArgument("instance_id is required", field="instance_id")
        known = self._table.get(request.instance_id) is not None
        span = trace.get_current_span()
        span.set_attribute("instance_id", request.instance_id)
        span.set_attribute("request_id", request.request_id)
        span.set_attribute("reason", request.reason)
        if known and self._suspects is not None:
            self._suspects.report(request.instance_id, request.reason)
        return scheduler_pb2.ReportInstanceFailureResponse(known=known)

    async def GetSchedulerStats(
        self, request: scheduler_pb2.GetSchedulerStatsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.GetSchedulerStatsResponse:
        predictor = self._router.predictor
        return scheduler_pb2.GetSchedulerStatsResponse(
            decisions=dict(self._router.decisions),
            predictions=predictor.predictions,
            predictions_correct=predictor.correct,
            predictor_accuracy=predictor.accuracy,
            prefix_index_blocks=len(self._router.index),
            instances=len(self._table.all()),
        )
