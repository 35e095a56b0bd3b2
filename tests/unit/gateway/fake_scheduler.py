"""A SchedulerService stand-in: routes to instances the test registers with it.

The gateway's unit tests depend on the Route contract (the proto), not on the scheduler's
algorithm; the integration tests run the real scheduler.
"""

from __future__ import annotations

import asyncio

import grpc

from deepserve.rpc.server import GrpcService, start_grpc_server
from deepserve.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc


class StaticScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Round-robin over the instances added per model; records every RouteRequest."""

    def __init__(self) -> None:
        self.instances: dict[str, list[common_pb2.Instance]] = {}
        self.requests: list[scheduler_pb2.RouteRequest] = []
        self.failure_reports: list[scheduler_pb2.ReportInstanceFailureRequest] = []
        self._turn = 0
        self.route_delay_s = 0.0  # how long Route takes to answer
        self.service: GrpcService | None = None

    def add(self, instance: common_pb2.Instance) -> None:
        self.instances.setdefault(instance.model, []).append(instance)

    async def start(self) -> str:
        self.service = await start_grpc_server(
            [lambda s: scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(self, s)],
            ["deepserve.v1.SchedulerService"],
            host="127.0.0.1",
            port=0,
        )
        return f"127.0.0.1:{self.service.port}"

    async def stop(self) -> None:
        if self.service is not None:
            await self.service.server.stop(0)

    async def Route(
        self, request: scheduler_pb2.RouteRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.RouteResponse:
        self.requests.append(request)
        if self.route_delay_s:
            await asyncio.sleep(self.route_delay_s)
        live = [
            i
            for i in self.instances.get(request.model, [])
            if i.instance_id not in request.exclude_instance_ids
        ]
        if not live:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no live instance of {request.model}")
        self._turn += 1
        return scheduler_pb2.RouteResponse(
            instances=[live[self._turn % len(live)]], branch=scheduler_pb2.ROUTE_BRANCH_ANY
        )

    async def ReportInstanceFailure(
        self,
        request: scheduler_pb2.ReportInstanceFailureRequest,
        context: grpc.aio.ServicerContext,
    ) -> scheduler_pb2.ReportInstanceFailureResponse:
        self.failure_reports.append(request)
        known = any(
            i.instance_id == request.instance_id for group in self.instances.values() for i in group
        )
        return scheduler_pb2.ReportInstanceFailureResponse(known=known)
