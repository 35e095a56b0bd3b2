"""Prometheus metrics of the pod pool, read from its etcd mirror at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from deepserve.podpool.pod_view import PodView
from deepserve.records import PodState


class PoolCollector(Collector):
    """`deepserve_warm_pods` and `deepserve_pods{state}` from the pod view."""

    def __init__(self, view: PodView) -> None:
        self._view = view

    def collect(self) -> Iterator[GaugeMetricFamily]:
        pods = self._view.list()
        warm = GaugeMetricFamily("deepserve_warm_pods", "Pre-warmed pods ready for a task")
        warm.add_metric([], sum(1 for p in pods if p.state == PodState.WARM))
        yield warm
        by_state = GaugeMetricFamily("deepserve_pods", "Pods by state", labels=["state"])
        for state in PodState:
            by_state.add_metric([state.value], sum(1 for p in pods if p.state == state))
        yield by_state
