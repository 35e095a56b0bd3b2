"""HTTP plumbing around calls: SSE responses that notice a departed client at once, a race of
any awaitable against the client's disconnect, and the x-request-id middleware.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deepserve.errors import Cancelled
from deepserve.gateway.gateway_metrics import HTTP_REQUESTS
from deepserve.gateway.request_ids import request_id_from

T = TypeVar("T")
_tracer = trace.get_tracer(__name__)


class RequestIdMiddleware:
    """Gives every request an id (the client's x-request-id when sane) and echoes it back.

    A plain ASGI middleware: unlike an `@app.middleware("http")` one it adds no task or
    buffering per request and passes streams and disconnects through untouched.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                given = value.decode("latin-1")
                break
        request_id = request_id_from(given)
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode())
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        # The request's root span (its trace continues through Route and Generate); it carries
        # the request id, so `deepserve trace <request id>` finds the whole tree.
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        span = _tracer.start_span(
            f"{scope['method']} {scope['path']}",
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"request_id": request_id, "http.method": scope["method"]},
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            otel_context.detach(token)
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            span.set_attribute("http.route", template)
            span.set_attribute("http.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            span.end()
            HTTP_REQUESTS.labels(template, str(status)).inc()


async def _disconnected(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Runs `work` but cancels it (raising Cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise Cancelled("the client closed the connection")


class EventStreamResponse(Response):
    """An SSE response whose producer is cancelled the moment the client disconnects."""

    def __init__(self, events: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> None:
        # Not Response.__init__: there is no body to render, only the stream.
        self.status_code = 200
        self.background = None
        self._events = events
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
            *((k.lower().encode(), v.encode()) for k, v in (headers or {}).items()),
        ]

    async def _pump(self, send: Send) -> None:
        try:
            async for event in self._events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self._events.aclose()  # type: ignore[attr-defined]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        pump = asyncio.ensure_future(self._pump(send))
        watcher = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, watcher):
                task.cancel()
            results = await asyncio.gather(pump, watcher, return_exceptions=True)
        error = results[0]
        if isinstance(error, Exception) and not isinstance(error, OSError):
            raise error


def sse(data: Any) -> bytes:
    """One SSE event; `data` is already-encoded JSON text."""
    return b"data: " + (data.encode() if isinstance(data, str) else data) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
