"""The Gateway API Inference Extension gauges as Prometheus exposes them: vLLM's names, KV use
as a fraction, and the LoRA info gauge carrying whatever adapters the engine reports (the hook
LoRA serving plugs into). A real pod's figures are checked in test_kubernetes_pods."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from deepserve.flowserve.engine.stats import EngineStats
from deepserve.flowserve.pod.gaie_metrics import GaieMetricsCollector, LoraAdapters


class StatsOnly:
    """An engine as the collector sees it: its stats() snapshot."""

    def __init__(self, stats: EngineStats) -> None:
        self._stats = stats

    def stats(self) -> EngineStats:
        return self._stats


def exposed(collector: GaieMetricsCollector) -> dict[str, list]:  # type: ignore[type-arg]
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_a_busy_engine_reports_queues_kv_use_and_adapters() -> None:
    engine = StatsOnly(
        EngineStats(num_running=3, num_waiting=5, kv_blocks_used=48, kv_blocks_total=64)
    )
    families = exposed(
        GaieMetricsCollector(
            lambda: (engine, "qwen"),
            adapters=lambda: LoraAdapters(running=["sql", "chat"], waiting=["math"], max_lora=4),
        )
    )
    assert families["vllm:num_requests_running"][0].value == 3
    assert families["vllm:num_requests_waiting"][0].value == 5
    assert families["vllm:kv_cache_usage_perc"][0].value == 0.75
    assert families["vllm:num_requests_running"][0].labels == {"model_name": "qwen"}
    (lora,) = families["vllm:lora_requests_info"]
    assert lora.labels == {
        "running_lora_adapters": "sql,chat",
        "waiting_lora_adapters": "math",
        "max_lora": "4",
    }
    assert lora.value > 1e9  # the reading's time, which the endpoint picker orders by


def test_a_warm_pod_reports_an_idle_server() -> None:
    families = exposed(GaieMetricsCollector(lambda: None))
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
    ):
        assert families[name][0].value == 0
    assert families["vllm:lora_requests_info"][0].labels["running_lora_adapters"] == ""
