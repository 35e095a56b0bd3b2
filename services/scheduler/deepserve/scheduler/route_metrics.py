"""Prometheus metrics of routing decisions."""

from __future__ import annotations

from prometheus_client import Counter

from deepserve.metrics import registry

ROUTE_DECISIONS = Counter(
    "deepserve_route_decisions",
    "Route decisions by model, deployment policy and the branch of Algorithm 1 that chose",
    ["model", "policy", "branch", "disaggregated"],
    registry=registry(),
)
