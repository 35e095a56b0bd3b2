"""Stored Responses API turns: conversation state kept server-side per tenant, in etcd.

One record per response, under the tenant's prefix (`/deepserve/responses/<tenant>/<id>`), so a
response id of another tenant simply does not exist for the caller. A record holds the whole
conversation up to and including its own output (chat messages, without the turn's
instructions, which OpenAI does not carry over), so a later turn naming it as
`previous_response_id` needs one read. It is written once, by the gateway that created it (its
one writer; deleting is the owner's call), attached to a lease nobody keeps alive: etcd drops it
at its expiry whichever gateways run then, and readers also refuse one past `expires_at` in the
second before etcd does.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, Field

from deepserve.errors import InvalidArgument, NotFound
from deepserve.store.etcd import EtcdStore, TypedPrefix
from deepserve.store.keys import Keys

# A stored conversation larger than this is refused (etcd's request limit is ~1.5 MiB).
MAX_RECORD_BYTES = 1024 * 1024


class ResponseRecord(BaseModel):
    """One stored response: the conversation through it, and the response object itself."""

    response_id: str
    tenant: str
    model: str
    created_at: float = Field(default_factory=time.time)
    expires_at: float = 0.0
    previous_response_id: str | None = None
    # Chat messages of the conversation through this response's output.
    messages: list[dict[str, Any]] = Field(default_factory=list)
    # This turn's input items as the client sent them (for GET .../input_items).
    input_items: list[dict[str, Any]] = Field(default_factory=list)
    # The Responses API object returned to the client.
    response: dict[str, Any] = Field(default_factory=dict)

    def expired(self, now: float | None = None) -> bool:
        return (
            bool(self.expires_at) and (now if now is not None else time.time()) >= self.expires_at
        )


class ResponseStore:
    """Creates, reads and deletes stored responses of each tenant."""

    def __init__(self, etcd: EtcdStore, retention_s: float) -> None:
        self._etcd = etcd
        self.retention_s = retention_s

    def _records(self, tenant: str) -> TypedPrefix[ResponseRecord]:
        return TypedPrefix(
            self._etcd,
            Keys.responses_prefix(tenant),
            ResponseRecord,
            lambda response_id: Keys.response(tenant, response_id),
        )

    async def create(self, record: ResponseRecord) -> ResponseRecord:
        record.expires_at = record.created_at + self.retention_s
        encoded = TypedPrefix.encode(record)
        if len(encoded) > MAX_RECORD_BYTES:
            raise InvalidArgument(
                f"the conversation is too large to store ({len(encoded)} bytes); "
                "send it without store",
                field="store",
            )
        lease = await self._etcd.grant_expiring_lease(int(self.retention_s) + 1)
        await self._records(record.tenant).create(record.response_id, record, lease_id=lease)
        return record

    async def get(
        self, tenant: str, response_id: str, field: str = "response_id"
    ) -> ResponseRecord:
        """The tenant's response, or NotFound (also when expired or another tenant's)."""
        found = await self._records(tenant).get(response_id) if response_id else None
        if found is None or found.record.expired():
            raise NotFound(f"response {response_id!r} not found", field=field)
        return found.record

    async def delete(self, tenant: str, response_id: str) -> None:
        if not await self._records(tenant).delete(response_id):
            raise NotFound(f"response {response_id!r} not found", field="response_id")
