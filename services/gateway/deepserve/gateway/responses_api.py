"""OpenAI Responses API routes: create (whole or streamed), retrieve, input items, delete."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from deepserve.completions.openai_errors import body_for, error_body
from deepserve.completions.responses import ResponsesRequest
from deepserve.errors import DeepServeError
from deepserve.gateway.auth import Caller
from deepserve.gateway.http_streams import EventStreamResponse, until_disconnect
from deepserve.gateway.responses import ResponsesService, Turn

log = logging.getLogger(__name__)
CallerDependency = Callable[..., Awaitable[Caller]]


def _event(event: dict[str, Any]) -> bytes:
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


async def _stream(service: ResponsesService, turn: Turn) -> AsyncIterator[bytes]:
    try:
        async for event in service.stream(turn):
            yield _event(event)
    except Exception as exc:
        if isinstance(exc, DeepServeError):
            _, body = body_for(exc)
            error = body["error"]
        else:
            log.exception("responses stream failed", exc_info=exc)
            error = error_body(f"internal error: {type(exc).__name__}", "server_error")["error"]
        yield _event({"type": "error", "sequence_number": -1, **error})
    finally:
        await turn.call.close()


def responses_router(service: ResponsesService, caller: CallerDependency) -> APIRouter:
    """The /v1/responses routes over a ResponsesService (tenant-scoped)."""
    router = APIRouter()

    @router.post("/v1/responses", response_model=None)
    async def create_response(
        body: ResponsesRequest, request: Request, who: Caller = Depends(caller)
    ) -> Any:
        request_id: str = request.state.request_id
        turn = await until_disconnect(request, service.open_turn(body, who, request_id))
        if body.stream:
            return EventStreamResponse(_stream(service, turn))
        try:
            return JSONResponse(await until_disconnect(request, service.collect(turn)))
        finally:
            await turn.call.close()

    @router.get("/v1/responses/{response_id}")
    async def get_response(response_id: str, who: Caller = Depends(caller)) -> dict[str, Any]:
        return await service.get(who.tenant, response_id)

    @router.get("/v1/responses/{response_id}/input_items")
    async def input_items(response_id: str, who: Caller = Depends(caller)) -> dict[str, Any]:
        return await service.input_items(who.tenant, response_id)

    @router.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str, who: Caller = Depends(caller)) -> dict[str, Any]:
        return await service.delete(who.tenant, response_id)

    return router
