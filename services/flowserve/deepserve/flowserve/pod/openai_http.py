"""A minimal OpenAI-compatible HTTP listener on the pod, for routers that send requests to
model servers directly (an InferencePool's endpoint picker chooses a Pod and the Gateway proxies
the client's OpenAI request to it).

It serves the pod's loaded model only, one choice per request: POST /v1/completions and
/v1/chat/completions (plain JSON or SSE with `stream`), GET /v1/models and GET /health (200 only
while a model is loaded). Requests are parsed, templated and tokenized by the same shared code
as the gateway's (deepserve.completions); tools, response formats, logprobs and n > 1 stay with
the gateway, and a request asking for them gets a 400 naming the field. Bad input gets an
OpenAI-style error body naming the field; nothing here touches the platform's routing.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from deepserve.completions.openai_errors import body_for, error_body
from deepserve.completions.prepare import build_sampling, chat_prompt, completion_prompts
from deepserve.completions.protocol import ChatCompletionRequest, CompletionRequest
from deepserve.errors import DeepServeError, InvalidArgument, NotFound, Unavailable
from deepserve.flowserve.pod.engine_metrics import RequestLatency

log = logging.getLogger(__name__)

# Fields this listener leaves to the gateway; a request setting them is refused, not ignored.
GATEWAY_ONLY = ("tools", "response_format", "cached_context_id", "suffix")


def _error(exc: DeepServeError) -> web.Response:
    status, body = body_for(exc)
    return web.json_response(body, status=status)


def _invalid(exc: ValidationError) -> web.Response:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or None
    body = error_body(first["msg"], "invalid_request_error", field, "invalid_value")
    return web.json_response(body, status=400)


class OpenAIHttpListener:
    """Serves OpenAI requests with the shell's engine and tokenizer."""

    def __init__(self, shell: Any) -> None:
        self._shell = shell
        self._runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        return app

    async def start(self, host: str, port: int) -> int:
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("OpenAI HTTP listener serving", extra={"fields": {"port": self.port}})
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # --- handlers --------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        if self._shell.engine is None:
            return web.json_response({"status": "no model loaded"}, status=503)
        return web.json_response({"status": "ok", "model": self._shell.model_name})

    async def _models(self, request: web.Request) -> web.Response:
        names = [self._shell.model_name] if self._shell.engine is not None else []
        data = [{"id": n, "object": "model", "owned_by": "deepserve"} for n in names]
        return web.json_response({"object": "list", "data": data})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, CompletionRequest, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, ChatCompletionRequest, chat=True)

    async def _serve(
        self, request: web.Request, kind: type[BaseModel], *, chat: bool
    ) -> web.StreamResponse:
        try:
            raw = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(InvalidArgument("the body is not JSON", field="body"))
        if not isinstance(raw, dict):
            return _error(InvalidArgument("the body must be a JSON object", field="body"))
        try:
            body: Any = kind.model_validate(raw)
        except ValidationError as exc:
            return _invalid(exc)
        try:
            prompt_ids, params = self._prepare(body, raw, chat=chat)
            request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            outputs = self._shell.engine.generate(request_id, prompt_ids, params)
            # The first output before any byte is sent: a refusal becomes a proper status.
            first = await anext(outputs)
            if first.error is not None:
                raise first.error
        except DeepServeError as exc:
            return _error(exc)
        except StopAsyncIteration:
            return _error(Unavailable("the engine ended the request without output"))
        stream = _outputs(first, outputs, RequestLatency(self._shell.model_name))
        if body.stream:
            return await self._sse(request, request_id, body, stream, chat=chat)
        return await self._whole(request_id, body, stream, chat=chat)

    def _prepare(self, body: Any, raw: dict[str, Any], *, chat: bool) -> tuple[list[int], Any]:
        shell = self._shell
        if shell.engine is None or shell.tokenizer is None:
            raise Unavailable("this pod has no model loaded")
        if body.model != shell.model_name:
            raise NotFound(
                f"this pod serves {shell.model_name!r}, not {body.model!r}", field="model"
            )
        for name in GATEWAY_ONLY:
            if raw.get(name) is not None:
                raise InvalidArgument("not served by an engine pod; use the gateway", field=name)
        if body.n != 1:
            raise InvalidArgument("an engine pod serves one choice per request", field="n")
        if raw.get("logprobs"):
            raise InvalidArgument("not served by an engine pod; use the gateway", field="logprobs")
        if chat:
            prompt = chat_prompt(body, shell.tokenizer)
            max_tokens = body.max_completion_tokens or body.max_tokens
        else:
            prompts = completion_prompts(body, shell.tokenizer)
            if len(prompts) != 1:
                raise InvalidArgument("an engine pod serves one prompt per request", field="prompt")
            prompt = prompts[0]
            max_tokens = body.max_tokens
        params = build_sampling(
            body,
            max_tokens=max_tokens,
            logprobs=False,
            top_logprobs=0,
            vocab_size=shell.tokenizer.vocab_size,
        )
        return prompt.token_ids, params

    async def _whole(
        self, request_id: str, body: Any, stream: AsyncIterator[Any], *, chat: bool
    ) -> web.Response:
        text, finish, usage = [], None, {}
        try:
            async for out in stream:
                text.append(out.new_text)
                finish = out.finish_reason or finish
                usage = _usage(out)
        except DeepServeError as exc:
            return _error(exc)
        content = "".join(text)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if chat:
            choice["message"] = {"role": "assistant", "content": content}
        else:
            choice["text"] = content
        return web.json_response(
            {
                "id": request_id,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": body.model,
                "choices": [choice],
                "usage": usage,
            }
        )

    async def _sse(
        self,
        request: web.Request,
        request_id: str,
        body: Any,
        stream: AsyncIterator[Any],
        *,
        chat: bool,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        created = int(time.time())
        object_name = "chat.completion.chunk" if chat else "text_completion"

        async def send(payload: dict[str, Any]) -> None:
            await response.write(f"data: {json.dumps(payload)}\n\n".encode())

        usage: dict[str, int] = {}
        try:
            async for out in stream:
                usage = _usage(out)
                choice: dict[str, Any] = {"index": 0, "finish_reason": out.finish_reason}
                if chat:
                    choice["delta"] = {"content": out.new_text}
                else:
                    choice["text"] = out.new_text
                chunk = {
                    "id": request_id,
                    "object": object_name,
                    "created": created,
                    "model": body.model,
                    "choices": [choice],
                }
                await send(chunk)
            if body.stream_options is not None and body.stream_options.include_usage:
                await send(
                    {
                        "id": request_id,
                        "object": object_name,
                        "created": created,
                        "model": body.model,
                        "choices": [],
                        "usage": usage,
                    }
                )
        except DeepServeError as exc:
            _, error = body_for(exc)
            await send(error)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def _outputs(
    first: Any, rest: AsyncIterator[Any], latency: RequestLatency
) -> AsyncIterator[Any]:
    """Every engine output of one request, timed like a gRPC Generate; an error raises."""
    try:
        out = first
        while True:
            if out.error is not None:
                raise out.error
            latency.on_tokens(len(out.new_token_ids))
            if out.finish_reason is not None:
                latency.on_finish(out.finish_reason)
            yield out
            if out.finish_reason is not None:
                return
            out = await anext(rest)
    except StopAsyncIteration:
        return
    finally:
        # Closing the engine's generator aborts the request (a client that went away).
        await rest.aclose()  # type: ignore[attr-defined]


def _usage(out: Any) -> dict[str, int]:
    return {
        "prompt_tokens": out.num_prompt_tokens,
        "completion_tokens": out.num_output_tokens,
        "total_tokens": out.num_prompt_tokens + out.num_output_tokens,
    }
