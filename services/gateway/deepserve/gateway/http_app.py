"""The OpenAI-compatible HTTP API (FastAPI): completions, chat completions, models."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deepserve.completions.call import ApiCall
from deepserve.completions.openai_errors import body_for, error_body
from deepserve.completions.protocol import ChatCompletionRequest, CompletionRequest
from deepserve.completions.response_format import ResponseFormatter
from deepserve.errors import DeepServeError, ResourceExhausted, Unavailable
from deepserve.gateway.auth import Caller
from deepserve.gateway.cached_contexts_api import cached_contexts_router
from deepserve.gateway.gateway import Gateway
from deepserve.gateway.http_streams import (
    SSE_DONE,
    EventStreamResponse,
    RequestIdMiddleware,
    sse,
    until_disconnect,
)
from deepserve.gateway.model_directory import ModelCard
from deepserve.gateway.responses_api import responses_router

log = logging.getLogger(__name__)

UNAVAILABLE_RETRY_AFTER_S = 5
# Names pydantic puts in an error's location for the branches of a union type.
_TYPE_LABELS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _model_json(card: ModelCard) -> dict[str, Any]:
    return {
        "id": card.model_id,
        "object": "model",
        "created": int(card.created_at),
        "owned_by": card.owned_by,
    }


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def error_response(exc: DeepServeError) -> JSONResponse:
    status, body = body_for(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, ResourceExhausted):
        headers["retry-after"] = str(math.ceil(exc.retry_after_s or 1))
        if exc.field in ("requests_per_min", "tokens_per_min", "max_concurrent"):
            body["error"]["code"] = "rate_limit_exceeded"
    elif isinstance(exc, Unavailable):
        headers["retry-after"] = str(UNAVAILABLE_RETRY_AFTER_S)
    return JSONResponse(body, status_code=status, headers=headers)


def _stream_error(exc: BaseException) -> bytes:
    if isinstance(exc, DeepServeError):
        _, body = body_for(exc)
    else:
        log.exception("stream failed", exc_info=exc)
        body = error_body(f"internal error: {type(exc).__name__}", "server_error")
    return sse(_dumps(body))


async def _events(call: ApiCall) -> AsyncIterator[bytes]:
    """SSE events of a streaming call; an error after the first token becomes an error event."""
    fmt = ResponseFormatter(call)
    try:
        opening = fmt.role_chunk()
        if opening is not None:
            yield sse(_dumps(opening))
        async for delta in call:
            chunk = fmt.chunk(delta)
            if chunk is not None:
                yield sse(_dumps(chunk))
        if call.job.include_usage:
            yield sse(_dumps(fmt.usage_chunk()))
    except Exception as exc:
        yield _stream_error(exc)
    finally:
        await call.close()
    yield SSE_DONE


async def _collect(call: ApiCall) -> dict[str, Any]:
    async with call:
        deltas = [delta async for delta in call]
    return ResponseFormatter(call).response(deltas)


# Builds a router of further routes (files, fine-tuning, batches) given the auth dependency.
RouterFactory = Callable[[Callable[..., Awaitable[Caller]]], APIRouter]


def create_app(gateway: Gateway, routers: Sequence[RouterFactory] = ()) -> FastAPI:
    app = FastAPI(
        title="DeepServe",
        version="0.1.0",
        description="OpenAI-compatible LLM serving",
    )
    app.add_middleware(RequestIdMiddleware)  # type: ignore[arg-type]

    async def caller(authorization: str | None = Header(default=None)) -> Caller:
        # A dependency, so a bad key is refused (401) before the body is looked at; async, so
        # FastAPI does not hop to its thread pool for a dict lookup.
        return gateway.authenticate(authorization)

    @app.exception_handler(DeepServeError)
    async def domain_error(_request: Request, exc: DeepServeError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ())[1:]]
        # Drop pydantic's union-branch labels ("str", "list[int]") so the field path stays clean.
        path = [p for p in loc if not any(c in p for c in "[]") and p not in _TYPE_LABELS]
        param = ".".join(path) or None
        message = (
            f"{param}: {first.get('msg', 'invalid request')}" if param else "invalid request body"
        )
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type_), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected_error(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse(
            error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500
        )

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models(who: Caller = Depends(caller)) -> dict[str, Any]:
        cards = gateway.models.list(who.tenant)
        return {"object": "list", "data": [_model_json(c) for c in cards]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, who: Caller = Depends(caller)) -> dict[str, Any]:
        return _model_json(gateway.models.get(model_id, who.tenant))

    async def run(
        body: ChatCompletionRequest | CompletionRequest, request: Request, who: Caller
    ) -> Any:
        request_id: str = request.state.request_id
        call = await until_disconnect(request, gateway.open_call(body, who, request_id))
        if body.stream:
            return EventStreamResponse(_events(call))
        try:
            return JSONResponse(await until_disconnect(request, _collect(call)))
        finally:
            await call.close()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        body: ChatCompletionRequest, request: Request, who: Caller = Depends(caller)
    ) -> Any:
        return await run(body, request, who)

    @app.post("/v1/completions", response_model=None)
    async def completions(
        body: CompletionRequest, request: Request, who: Caller = Depends(caller)
    ) -> Any:
        return await run(body, request, who)

    if gateway.responses is not None:
        app.include_router(responses_router(gateway.responses, caller))
    if gateway.contexts is not None:
        app.include_router(cached_contexts_router(gateway.contexts, caller))
    for build_router in routers:
        app.include_router(build_router(caller))
    return app
