"""Adapter records: a LoRA adapter registered against a base model, owned by one tenant.

jobmgr is the one writer (`RegisterAdapter`, `DeleteAdapter`, and its fine-tuning controller);
gateways read them to resolve a request's `model` and to list a tenant's models.
"""

from __future__ import annotations

import time

from pydantic import BaseModel, Field

from deepserve.store.etcd import EtcdStore, TypedPrefix
from deepserve.store.keys import Keys


class AdapterRecord(BaseModel):
    """One registered adapter; `path` is a directory every instance of its base can read."""

    name: str
    tenant: str
    base_model: str
    path: str
    rank: int
    source: str = "upload"  # "upload" or "fine_tuning"
    job_id: str = ""
    created_at: float = Field(default_factory=time.time)

    @property
    def adapter_id(self) -> str:
        """Its record's name, unique across tenants."""
        return adapter_id(self.tenant, self.name)

    @property
    def serving_id(self) -> str:
        """What engines, routing and prefix caches key it by: its id and registration time, so
        an adapter deleted and registered again with other weights is never served stale."""
        return f"{self.adapter_id}@{int(self.created_at * 1000)}"


def adapter_id(tenant: str, name: str) -> str:
    return f"{tenant}/{name}"


def adapters(store: EtcdStore) -> TypedPrefix[AdapterRecord]:
    return TypedPrefix(
        store,
        Keys.adapters_prefix(),
        AdapterRecord,
        Keys.adapter,
    )
