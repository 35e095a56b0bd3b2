"""The model-server metrics of the Gateway API Inference Extension (GAIE) protocol.

Kubernetes-native routers (an InferencePool's endpoint picker, e.g. llm-d's) scrape each model
server's /metrics for queue depth, KV-cache use and loaded LoRA adapters, under vLLM's names,
which the protocol adopted. Every FlowServe pod exports them beside its own deepserve_engine_*
figures, read from the engine at scrape time:

- vllm:num_requests_waiting   requests queued, not started
- vllm:num_requests_running   requests in the engine's steps
- vllm:kv_cache_usage_perc    KV blocks in use / KV blocks (0..1, as vLLM reports it)
- vllm:lora_requests_info     value: the time of the reading; labels running_lora_adapters and
                              waiting_lora_adapters (comma-separated names) and max_lora

A warm pod (no model) reports an idle server: zero queues, no KV in use, no adapters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


@dataclass(frozen=True, slots=True)
class LoraAdapters:
    """Adapters with requests running or waiting, and how many may be loaded at once."""

    running: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    max_lora: int = 0


def no_adapters() -> LoraAdapters:
    """For an engine without adapters (tests, tools): none running or waiting."""
    return LoraAdapters()


class GaieMetricsCollector(Collector):
    """The GAIE gauges from the engine's stats (and its adapters) at scrape time."""

    def __init__(
        self,
        describe: Callable[[], tuple[Any, str] | None],
        adapters: Callable[[], LoraAdapters] = no_adapters,
    ) -> None:
        # describe() -> (engine, model name), or None while the pod holds no model.
        self._describe = describe
        self._adapters = adapters

    def collect(self) -> Iterator[GaugeMetricFamily]:
        current = self._describe()
        waiting = running = 0
        usage = 0.0
        model = ""
        if current is not None:
            engine, model = current
            stats = engine.stats()
            waiting, running = stats.num_waiting, stats.num_running
            if stats.kv_blocks_total > 0:
                usage = stats.kv_blocks_used / stats.kv_blocks_total
        labels = ["model_name"]
        for name, doc, value in (
            ("vllm:num_requests_waiting", "Requests waiting to be processed", waiting),
            ("vllm:num_requests_running", "Requests in model execution batches", running),
            ("vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent", usage),
        ):
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric([model], float(value))
            yield family
        adapters = self._adapters()
        lora = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running and waiting LoRA adapters (value: the time of the reading)",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        lora.add_metric(
            [",".join(adapters.running), ",".join(adapters.waiting), str(adapters.max_lora)],
            time.time(),
        )
        yield lora
