"""A base for server interceptors that wrap each RPC method's handler.

The wrapped handler depends only on the method, so it is built once per method and reused:
grpc calls `intercept_service` on every RPC, and rebuilding handlers there (three interceptors
deep) was a measurable share of a short call such as Route.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
StreamBehavior = Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]


class MethodWrappingInterceptor(grpc.aio.ServerInterceptor):
    """Subclasses implement `wrap_unary` and `wrap_stream` for one method's behaviour."""

    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler | None] = {}

    def wrap_unary(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior:
        raise NotImplementedError

    def wrap_stream(self, method: str, behavior: StreamBehavior) -> StreamBehavior:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        if method in self._wrapped:
            return self._wrapped[method]  # type: ignore[return-value]
        handler = await continuation(details)
        self._wrapped[method] = wrapped = self._wrap(method, handler)
        return wrapped  # type: ignore[return-value]

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler | None) -> Any:
        if handler is None:
            return None
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self.wrap_unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self.wrap_stream(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # client-streaming methods: none in our APIs
