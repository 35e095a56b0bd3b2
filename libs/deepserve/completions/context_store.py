"""Explicit cached contexts: records of the prompts a tenant asked to keep cached, in etcd.

A cached context is a prompt prefix (from chat messages or a text prompt) that engines keep
pinned in their KV cache under its id until its TTL runs out; requests name it to continue it.
The record (`/deepserve/contexts/<tenant>/<id>`) holds the tokens and what they came from, is
written once by the gateway that created it, and lives on a lease nobody keeps alive, so etcd
drops it at its expiry. Engines hold the pins; each unpins at the same expiry by itself.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, Field

from deepserve.errors import NotFound, ResourceExhausted
from deepserve.store.etcd import EtcdStore, TypedPrefix
from deepserve.store.keys import Keys


class CachedContextRecord(BaseModel):
    """One cached context: whose, for which model, its tokens and until when."""

    context_id: str
    tenant: str
    model: str
    token_ids: list[int]
    # What it was made from: chat messages (continued by chat requests) or a prompt.
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    created_at: float = Field(default_factory=time.time)
    expires_at: float = 0.0
    ttl_seconds: int = 0
    # Tokens the first instance pinned (whole KV blocks of the context).
    pinned_tokens: int = 0

    def expired(self, now: float | None = None) -> bool:
        return (
            bool(self.expires_at) and (now if now is not None else time.time()) >= self.expires_at
        )

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.context_id,
            "object": "cached_context",
            "model": self.model,
            "created_at": int(self.created_at),
            "expires_at": int(self.expires_at),
            "ttl_seconds": self.ttl_seconds,
            "tokens": len(self.token_ids),
            "pinned_tokens": self.pinned_tokens,
            "source": "messages" if self.messages is not None else "prompt",
        }


class ContextStore:
    """Creates, reads, lists and deletes a tenant's cached contexts."""

    def __init__(self, etcd: EtcdStore) -> None:
        self._etcd = etcd

    def _records(self, tenant: str) -> TypedPrefix[CachedContextRecord]:
        return TypedPrefix(
            self._etcd,
            Keys.contexts_prefix(tenant),
            CachedContextRecord,
            lambda context_id: Keys.context(tenant, context_id),
        )

    async def list(self, tenant: str) -> list[CachedContextRecord]:
        found, _ = await self._records(tenant).list()
        now = time.time()
        return sorted(
            (v.record for v in found if not v.record.expired(now)), key=lambda r: r.created_at
        )

    async def check_room(self, tenant: str, max_contexts: int) -> None:
        """ResourceExhausted when the tenant already holds its limit of contexts."""
        if max_contexts > 0 and len(await self.list(tenant)) >= max_contexts:
            raise ResourceExhausted(
                f"the tenant holds {max_contexts} cached contexts, its limit; delete one first",
                field="max_cached_contexts",
            )

    async def create(self, record: CachedContextRecord) -> CachedContextRecord:
        lease = await self._etcd.grant_expiring_lease(record.ttl_seconds + 1)
        await self._records(record.tenant).create(record.context_id, record, lease_id=lease)
        return record

    async def get(
        self, tenant: str, context_id: str, field: str = "cached_context_id"
    ) -> CachedContextRecord:
        """The tenant's context, or NotFound naming `field` (also when expired)."""
        found = await self._records(tenant).get(context_id) if context_id else None
        if found is None or found.record.expired():
            raise NotFound(f"cached context {context_id!r} not found", field=field)
        return found.record

    async def delete(self, tenant: str, context_id: str) -> CachedContextRecord:
        record = await self.get(tenant, context_id, field="context_id")
        await self._records(tenant).delete(context_id)
        return record
