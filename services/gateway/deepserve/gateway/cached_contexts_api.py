"""Explicit context caching routes: /v1/cached_contexts (create, list, retrieve, delete)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends

from deepserve.gateway.auth import Caller
from deepserve.gateway.cached_contexts import CachedContextRequest, CachedContexts

CallerDependency = Callable[..., Awaitable[Caller]]


def cached_contexts_router(contexts: CachedContexts, caller: CallerDependency) -> APIRouter:
    """The /v1/cached_contexts routes over CachedContexts (tenant-scoped)."""
    router = APIRouter()

    @router.post("/v1/cached_contexts")
    async def create(body: CachedContextRequest, who: Caller = Depends(caller)) -> dict[str, Any]:
        return (await contexts.create(body, who)).to_openai()

    @router.get("/v1/cached_contexts")
    async def list_contexts(who: Caller = Depends(caller)) -> dict[str, Any]:
        found = await contexts.store.list(who.tenant)
        return {"object": "list", "data": [r.to_openai() for r in found]}

    @router.get("/v1/cached_contexts/{context_id}")
    async def get(context_id: str, who: Caller = Depends(caller)) -> dict[str, Any]:
        return (await contexts.store.get(who.tenant, context_id, field="context_id")).to_openai()

    @router.delete("/v1/cached_contexts/{context_id}")
    async def delete(context_id: str, who: Caller = Depends(caller)) -> dict[str, Any]:
        await contexts.delete(who.tenant, context_id)
        return {"id": context_id, "object": "cached_context", "deleted": True}

    return router
