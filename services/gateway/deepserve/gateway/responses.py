"""The Responses API's turns: conversation state from etcd, the chat path, output and storage.

A turn loads the stored conversation of `previous_response_id` (the caller's tenant only; an
unknown, expired or other tenant's id is a 404 naming the field), runs as a chat request through
`Gateway.open_call` (same limits, routing and accounting as chat), turns the deltas into output
items or streaming events, and, with `store`, saves the conversation through this turn so the
next one can continue it, from any gateway, after restarts, until it expires.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from deepserve.completions.call import ApiCall
from deepserve.completions.conversation_store import ResponseRecord, ResponseStore
from deepserve.completions.responses import (
    ResponseEvents,
    ResponsesRequest,
    chat_request,
    input_messages,
    new_response_id,
    now,
    response_object,
    turn_status,
)


@dataclass
class Turn:
    """One Responses call in flight: its request, its chat call, and the conversation so far."""

    request: ResponsesRequest
    call: ApiCall
    tenant: str
    response_id: str
    created_at: float
    history: list[dict[str, Any]]

    def events(self) -> ResponseEvents:
        tools = self.call.job.tools
        streamer = tools.streamer() if tools is not None and tools.mode != "none" else None
        return ResponseEvents(streamer)


class ResponsesService:
    """Runs, stores, retrieves and deletes Responses of each tenant."""

    def __init__(self, gateway: Any, store: ResponseStore) -> None:
        # deepserve.gateway.gateway.Gateway (typed loosely: it builds this object).
        self._gateway = gateway
        self.store = store

    async def open_turn(self, req: ResponsesRequest, caller: Any, request_id: str) -> Turn:
        history: list[dict[str, Any]] = []
        if req.previous_response_id:
            previous = await self.store.get(
                caller.tenant, req.previous_response_id, field="previous_response_id"
            )
            history = previous.messages
        body = chat_request(req, history)
        call = await self._gateway.open_call(body, caller, request_id)
        return Turn(req, call, caller.tenant, new_response_id(), now(), history)

    def _object(
        self, turn: Turn, events: ResponseEvents, status: str, reason: str | None
    ) -> dict[str, Any]:
        return response_object(
            turn.request,
            turn.response_id,
            created_at=turn.created_at,
            status=status,
            output=events.result.items,
            usage=turn.call.usage() if status != "in_progress" else None,
            incomplete_reason=reason,
        )

    async def collect(self, turn: Turn) -> dict[str, Any]:
        """The whole response (stored when asked)."""
        events = turn.events()
        finish: str | None = None
        async with turn.call:
            async for delta in turn.call:
                finished = delta.finish_reason is not None
                events.feed(delta.text, finished)
                if finished:
                    finish = delta.finish_reason
        status, reason = turn_status(finish)
        body = self._object(turn, events, status, reason)
        await self._store(turn, events, body)
        return body

    async def stream(self, turn: Turn) -> AsyncIterator[dict[str, Any]]:
        """The event sequence of a streamed response; the caller closes the call."""
        events = turn.events()
        started = self._object(turn, events, "in_progress", None)
        yield events.event("response.created", response=started)
        yield events.event("response.in_progress", response=started)
        finish: str | None = None
        async for delta in turn.call:
            finished = delta.finish_reason is not None
            for event in events.feed(delta.text, finished):
                yield event
            if finished:
                finish = delta.finish_reason
        await turn.call.close()
        status, reason = turn_status(finish)
        body = self._object(turn, events, status, reason)
        await self._store(turn, events, body)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        yield events.event(kind, response=body)

    async def _store(self, turn: Turn, events: ResponseEvents, body: dict[str, Any]) -> None:
        req = turn.request
        if not req.store:
            return
        messages = [*turn.history, *input_messages(req.input), events.result.assistant_message()]
        inputs = (
            [{"type": "message", "role": "user", "content": req.input}]
            if isinstance(req.input, str)
            else list(req.input)
        )
        await self.store.create(
            ResponseRecord(
                response_id=turn.response_id,
                tenant=turn.tenant,
                model=req.model,
                created_at=turn.created_at,
                previous_response_id=req.previous_response_id,
                messages=messages,
                input_items=inputs,
                response=body,
            )
        )

    async def get(self, tenant: str, response_id: str) -> dict[str, Any]:
        return (await self.store.get(tenant, response_id)).response

    async def input_items(self, tenant: str, response_id: str) -> dict[str, Any]:
        record = await self.store.get(tenant, response_id)
        return {"object": "list", "data": record.input_items, "has_more": False}

    async def delete(self, tenant: str, response_id: str) -> dict[str, Any]:
        await self.store.delete(tenant, response_id)
        return {"id": response_id, "object": "response", "deleted": True}
