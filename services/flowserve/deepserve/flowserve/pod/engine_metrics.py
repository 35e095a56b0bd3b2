"""Prometheus metrics of one FlowServe instance.

Queue, KV and cache figures are read from the engine's stats when Prometheus scrapes (no work on
the hot path); per-request latencies are observed as outputs stream out of Generate.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from deepserve.metrics import LATENCY_BUCKETS, TOKEN_LATENCY_BUCKETS, registry

ENGINE_TTFT = Histogram(
    "deepserve_engine_ttft_seconds",
    "Time from Generate to the first token, inside the engine's service",
    ["model"],
    buckets=LATENCY_BUCKETS,
    registry=registry(),
)
ENGINE_TPOT = Histogram(
    "deepserve_engine_tpot_seconds",
    "Mean time per output token after the first, per request",
    ["model"],
    buckets=TOKEN_LATENCY_BUCKETS,
    registry=registry(),
)
ENGINE_TOKENS = Counter(
    "deepserve_engine_generated_tokens",
    "Output tokens produced",
    ["model"],
    registry=registry(),
)
ENGINE_REQUESTS = Counter(
    "deepserve_engine_requests",
    "Finished requests by finish reason",
    ["model", "finish_reason"],
    registry=registry(),
)


class EngineStatsCollector(Collector):
    """Gauges from `engine.stats()` at scrape time; empty while the pod has no model."""

    def __init__(self, describe: Callable[[], tuple[Any, str, str] | None]) -> None:
        # describe() -> (engine, instance_id, model) or None when no model is loaded.
        self._describe = describe

    def collect(self) -> Iterator[GaugeMetricFamily]:
        current = self._describe()
        if current is None:
            return
        engine, instance_id, model = current
        stats = engine.stats()
        labels = ["instance_id", "model"]
        values = [instance_id, model]
        for name, doc, value in (
            (
                "deepserve_engine_requests_waiting",
                "Requests queued, not started",
                stats.num_waiting,
            ),
            (
                "deepserve_engine_requests_running",
                "Requests running (planned into the engine's steps)",
                stats.num_running,
            ),
            (
                "deepserve_engine_kv_blocks_used",
                "KV blocks in use on the device",
                stats.kv_blocks_used,
            ),
            ("deepserve_engine_kv_blocks_total", "KV blocks on the device", stats.kv_blocks_total),
            (
                "deepserve_engine_prefix_cache_hit_ratio",
                "Prompt tokens served from the prefix cache / prompt tokens",
                stats.prefix_cache_hit_rate,
            ),
            (
                "deepserve_engine_generation_tokens_per_second",
                "Output tokens per second over the last seconds",
                stats.generation_tokens_per_s,
            ),
        ):
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric(values, float(value))
            yield family


class RequestLatency:
    """Times one Generate stream: TTFT at the first token, TPOT at the end."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.tokens = 0

    def on_tokens(self, count: int) -> None:
        if count and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
            ENGINE_TTFT.labels(self.model).observe(self.first_token_at - self.started)
        self.tokens += count
        if count:
            ENGINE_TOKENS.labels(self.model).inc(count)

    def on_finish(self, finish_reason: str) -> None:
        ENGINE_REQUESTS.labels(self.model, finish_reason).inc()
        if self.first_token_at is not None and self.tokens > 1:
            per_token = (time.perf_counter() - self.first_token_at) / (self.tokens - 1)
            ENGINE_TPOT.labels(self.model).observe(per_token)
