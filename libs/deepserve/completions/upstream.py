"""gRPC clients of the gateway: the scheduler's Route and each engine's FlowServeService."""

from __future__ import annotations

import grpc

from deepserve.errors import DeadlineExceeded, DeepServeError, NotFound, Unavailable
from deepserve.rpc.client import insecure_channel
from deepserve.rpc.errors import error_from_rpc
from deepserve.v1 import common_pb2, flowserve_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc


def request_deadline_passed() -> DeadlineExceeded:
    """The error of a request whose own time limit ran out (HTTP 504), wherever it was."""
    return DeadlineExceeded("the request ran past its time limit")


class SchedulerClient:
    """Asks the scheduler which instance(s) serve a request."""

    def __init__(self, address: str, timeout_s: float) -> None:
        self._channel = insecure_channel(address)
        self._stub = scheduler_pb2_grpc.SchedulerServiceStub(self._channel)
        self._timeout_s = timeout_s

    async def route(
        self,
        request: scheduler_pb2.RouteRequest,
        *,
        timeout_s: float | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> list[common_pb2.Instance]:
        """The chosen instances, colocated: one; disaggregated: prefill then decode."""
        timeout = self._timeout_s if timeout_s is None else min(timeout_s, self._timeout_s)
        try:
            reply = await self._stub.Route(request, timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and timeout < self._timeout_s:
                # The request's own time ran out while routing, not the scheduler's patience.
                raise request_deadline_passed() from exc
            err = error_from_rpc(exc)
            if isinstance(err, NotFound):
                # The model is known (the gateway checked) but nothing serves it right now.
                raise Unavailable(
                    f"no instance of model {request.model!r} is serving now; retry later"
                ) from exc
            if isinstance(err, DeepServeError) and exc.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ):
                raise Unavailable(f"the scheduler cannot be reached: {exc.details()}") from exc
            raise err from exc
        if not reply.instances:
            raise Unavailable(f"the scheduler found no instance for model {request.model!r}")
        return list(reply.instances)

    async def report_completion(self, request: scheduler_pb2.ReportCompletionRequest) -> None:
        try:
            await self._stub.ReportCompletion(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from exc

    async def report_instance_failure(
        self, instance_id: str, reason: str, request_id: str = ""
    ) -> bool:
        """Asks the scheduler to stop routing to an instance seen failing; False if it could not
        be told (a lost report only delays the eviction until the instance's lease expires)."""
        try:
            reply = await self._stub.ReportInstanceFailure(
                scheduler_pb2.ReportInstanceFailureRequest(
                    instance_id=instance_id, reason=reason, request_id=request_id
                ),
                timeout=min(self._timeout_s, 2.0),
            )
        except grpc.aio.AioRpcError:
            return False
        return reply.known

    async def close(self) -> None:
        await self._channel.close()


# Engine channels ping this often: a stream from an instance whose host was cut off fails in a
# few seconds (and migrates) instead of hanging until the request's deadline.
ENGINE_KEEPALIVE_S = 2.0


class EngineStubs:
    """One channel and FlowServeService stub per engine address, opened on first use."""

    def __init__(self) -> None:
        self._stubs: dict[str, flowserve_pb2_grpc.FlowServeServiceStub] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> flowserve_pb2_grpc.FlowServeServiceStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = insecure_channel(address, keepalive_s=ENGINE_KEEPALIVE_S)
            self._channels[address] = channel
            stub = self._stubs[address] = flowserve_pb2_grpc.FlowServeServiceStub(channel)
        return stub

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._stubs.clear()
