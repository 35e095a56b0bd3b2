"""Demand for a model that has no live instance: the gateway holds its requests and says so here.

The gateway writes `/deepserve/demand/<model>` when it starts holding requests for a model at
zero replicas (and refreshes it while it keeps holding); the autoscaler watches the prefix and
scales that model's deployment from zero at once (pushed, not polled).
"""

from __future__ import annotations

import time

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
    return TypedPrefix(store, Keys.demand_prefix(), DemandRecord, Keys.demand)
