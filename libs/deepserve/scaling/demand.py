"""Demand for a model that has no live instance: the gateway holds its requests and says so here.

Each gateway writes its own record, `/deepserve/demand/<gateway>:<model>`, when it starts holding
requests for a model at zero replicas (and refreshes it while it keeps holding, deletes it when
none waits): one writer per record, so one gateway's clear never erases another's demand. The
autoscaler watches the prefix, adds up the fresh records of a model, and scales its deployment
from zero at once (pushed, not polled).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from pydantic import BaseModel, Field

from deepserve.store.etcd import EtcdStore, TypedPrefix
from deepserve.store.keys import Keys


class DemandRecord(BaseModel):
    """Requests waiting for a model with no live instance."""

    model: str
    # Requests the writer holds now.
    waiting: int = 1
    # When the writer last saw demand (unix seconds); stale records are ignored.
    at: float = Field(default_factory=time.time)
    # Which gateway process wrote it.
    source: str = ""


def demands(store: EtcdStore) -> TypedPrefix[DemandRecord]:
    """Demand records by entry name (`Keys.demand_entry(source, model)`)."""
    return TypedPrefix(store, Keys.demand_prefix(), DemandRecord, Keys.demand)


def waiting_for(records: Iterable[DemandRecord], model: str, now: float, ttl_s: float) -> int:
    """Requests held for `model` across every gateway, counting fresh records only."""
    return sum(r.waiting for r in records if r.model == model and now - r.at < ttl_s)
