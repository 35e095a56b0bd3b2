"""SchedulerService: translates RouteRequest/RouteResponse around the domain Router."""

from __future__ import annotations

import grpc

from deepserve.scheduler.instance_table import InstanceTable
from deepserve.scheduler.router import RouteFacts, Router
from deepserve.v1 import scheduler_pb2, scheduler_pb2_grpc
from deepserve.wire import instance_to_proto

_BRANCHES = {
    "locality": scheduler_pb2.ROUTE_BRANCH_LOCALITY,
    "load": scheduler_pb2.ROUTE_BRANCH_LOAD,
    "round_robin": scheduler_pb2.ROUTE_BRANCH_ROUND_ROBIN,
    "random": scheduler_pb2.ROUTE_BRANCH_RANDOM,
    "any": scheduler_pb2.ROUTE_BRANCH_ANY,
}


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, router: Router, table: InstanceTable) -> None:
        self._router = router
        self._table = table

    async def Route(
        self, request: scheduler_pb2.RouteRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.RouteResponse:
        decision = self._router.route(
            RouteFacts(
                request_id=request.request_id,
                model=request.model,
                tenant=request.tenant,
                prompt_tokens=request.prompt_tokens,
                max_tokens=request.max_tokens,
                prefix_block_hashes=list(request.prefix_block_hashes),
                exclude_instance_ids=set(request.exclude_instance_ids),
            )
        )
        return scheduler_pb2.RouteResponse(
            instances=[instance_to_proto(i) for i in decision.instances],
            disaggregated=decision.disaggregated,
            branch=_BRANCHES.get(decision.branch, scheduler_pb2.ROUTE_BRANCH_UNSPECIFIED),
            reason=decision.reason,
            scores=decision.scores,
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
