"""Server-side tracing for grpc.aio: one SERVER span per call, parented by the caller's W3C
trace context from the metadata.

A server-streaming handler is an async generator that grpc may resume from different contexts,
so holding the span current across its yields breaks ("failed to detach context"). Instead the
span is attached around each step of the handler (`anext`) and detached before the message is
yielded; whatever the handler starts (engine requests, calls to other services, tasks) inherits
the span, and messages and the final status keep their order.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from deepserve.rpc.interceptor_base import MethodWrappingInterceptor, StreamBehavior, UnaryBehavior

_tracer = trace.get_tracer("deepserve.rpc")


def _parent_context(context: grpc.aio.ServicerContext) -> otel_context.Context:
    carrier = {key: value for key, value in (context.invocation_metadata() or ())}
    return propagate.extract(carrier)


def _finish(
    span: trace.Span, context: grpc.aio.ServicerContext, failed: BaseException | None
) -> None:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code != grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, code.name))
    elif failed is not None and not isinstance(failed, asyncio.CancelledError):
        span.set_status(Status(StatusCode.ERROR, type(failed).__name__))
    if isinstance(failed, asyncio.CancelledError):
        span.set_attribute("rpc.cancelled", True)
    span.end()


class TracingServerInterceptor(MethodWrappingInterceptor):
    """Starts a SERVER span per call; the servicer runs with that span current."""

    @staticmethod
    def _starter(method: str) -> Callable[[grpc.aio.ServicerContext], trace.Span]:
        full_method = method.lstrip("/")
        service, _, name = full_method.rpartition("/")

        def start(context: grpc.aio.ServicerContext) -> trace.Span:
            span = _tracer.start_span(
                full_method, context=_parent_context(context), kind=SpanKind.SERVER
            )
            span.set_attribute("rpc.system", "grpc")
            span.set_attribute("rpc.service", service)
            span.set_attribute("rpc.method", name)
            return span

        return start

    def wrap_unary(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior:
        start = self._starter(method)

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            span = start(context)
            failed: BaseException | None = None
            token = otel_context.attach(trace.set_span_in_context(span))
            try:
                return await behavior(request, context)
            except BaseException as exc:
                failed = exc
                raise
            finally:
                otel_context.detach(token)
                _finish(span, context, failed)

        return unary_unary

    def wrap_stream(self, method: str, behavior: StreamBehavior) -> StreamBehavior:
        start = self._starter(method)

        async def unary_stream(
            request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            span = start(context)
            span_context = trace.set_span_in_context(span)
            failed: BaseException | None = None
            messages = behavior(request, context)
            try:
                while True:
                    # The span is current for each step of the handler, and only then: grpc
                    # may resume this generator from another context between messages.
                    token = otel_context.attach(span_context)
                    try:
                        item = await anext(messages)
                    except StopAsyncIteration:
                        break
                    finally:
                        otel_context.detach(token)
                    yield item
            except BaseException as exc:
                failed = exc
                raise
            finally:
                with contextlib.suppress(BaseException):
                    await messages.aclose()  # type: ignore[attr-defined]
                _finish(span, context, failed)

        return unary_stream
