"""Tenants and their limits, kept in etcd under /deepserve/tenants/<tenant>."""

from __future__ import annotations

import time

from pydantic import BaseModel, Field

from deepserve.errors import Conflict, InvalidArgument
from deepserve.store.etcd import EtcdStore, TypedPrefix
from deepserve.store.keys import Keys

TENANTS_PREFIX = Keys.tenants_prefix()


def tenant_key(tenant: str) -> str:
    if not tenant:
        raise InvalidArgument("a tenant name is required", field="tenant")
    return Keys.tenant(tenant)


class TenantLimits(BaseModel):
    """Per-tenant bounds; 0 means unlimited."""

    requests_per_min: int = Field(default=0, ge=0)
    tokens_per_min: int = Field(default=0, ge=0)
    max_concurrent: int = Field(default=0, ge=0)
    # Explicit cached contexts the tenant may hold at once (0: the gateway's default).
    max_cached_contexts: int = Field(default=0, ge=0)

    @property
    def unlimited(self) -> bool:
        return not (self.requests_per_min or self.tokens_per_min or self.max_concurrent)


class TenantRecord(BaseModel):
    """A tenant: the unit that owns API keys, limits and usage."""

    tenant: str
    limits: TenantLimits = Field(default_factory=TenantLimits)
    created_at: float = Field(default_factory=time.time)


class Tenants:
    """Typed access to the tenant records."""

    def __init__(self, store: EtcdStore) -> None:
        self.records: TypedPrefix[TenantRecord] = TypedPrefix(
            store, TENANTS_PREFIX, TenantRecord, tenant_key
        )

    async def get(self, tenant: str) -> TenantRecord | None:
        found = await self.records.get(tenant)
        return found.record if found is not None else None

    async def set_limits(self, tenant: str, limits: TenantLimits) -> TenantRecord:
        """Creates the tenant or replaces its limits (compare-and-swap, safe against races)."""
        record = TenantRecord(tenant=tenant, limits=limits)
        try:
            await self.records.create(tenant, record)
            return record
        except Conflict:
            pass

        def change(current: TenantRecord) -> TenantRecord:
            return current.model_copy(update={"limits": limits})

        return (await self.records.update(tenant, change)).record

    async def ensure(self, tenant: str) -> TenantRecord:
        """The tenant's record, created with no limits if it does not exist."""
        record = TenantRecord(tenant=tenant)
        try:
            await self.records.create(tenant, record)
            return record
        except Conflict:
            return (await self.records.require(tenant)).record

    async def list(self) -> list[TenantRecord]:
        found, _ = await self.records.list()
        return [v.record for v in found]
