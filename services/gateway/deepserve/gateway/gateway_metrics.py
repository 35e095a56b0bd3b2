"""Prometheus metrics of the gateway: requests by route and status, and per-request latencies
as the client sees them (time to first token, time per output token, end to end)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from deepserve.metrics import LATENCY_BUCKETS, TOKEN_LATENCY_BUCKETS, registry

HTTP_REQUESTS = Counter(
    "deepserve_http_requests",
    "HTTP requests by route template and status code",
    ["route", "status"],
    registry=registry(),
)
REQUEST_TTFT = Histogram(
    "deepserve_request_ttft_seconds",
    "From the request's arrival at the gateway to its first token",
    ["model"],
    buckets=LATENCY_BUCKETS,
    registry=registry(),
)
REQUEST_TPOT = Histogram(
    "deepserve_request_tpot_seconds",
    "Mean time per output token after the first, per choice",
    ["model"],
    buckets=TOKEN_LATENCY_BUCKETS,
    registry=registry(),
)
REQUEST_E2E = Histogram(
    "deepserve_request_e2e_seconds",
    "From the request's arrival to its last token",
    ["model"],
    buckets=LATENCY_BUCKETS,
    registry=registry(),
)
