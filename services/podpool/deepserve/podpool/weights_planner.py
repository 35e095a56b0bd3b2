"""Where a new instance's weights come from (scale-up step 3): DRAM copy, fork, or disk.

In order of preference, for a pod on this host:
1. a DRAM copy of the model on the pod's host: mapped, no transfer at all;
2. a fork to the same host for the same model already in flight: wait for it, then map the
   copy it leaves (a fork target publishes what it received into the host's cache), so a
   burst on one host streams the weights once, not once per pod;
3. a running instance of the model (tp 1): fork from the one feeding the fewest targets now,
   new instances included, so a large burst spreads over a growing set of sources (a relay
   tree) instead of one source feeding all;
4. otherwise the pod reads the disk (or a copy it finds itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from deepserve.podpool.dram_cache import DramPreloader
from deepserve.records import InstanceRecord, PodRecord
from deepserve.scaling.timeline import WeightsSource
from deepserve.scaling.weights_plan import WeightsPlan


class WeightsPlanner:
    """Chooses each load's weights source and tracks forks in flight."""

    def __init__(
        self,
        instances: Callable[[], Mapping[str, InstanceRecord]],
        *,
        dram: DramPreloader | None = None,
        fork: bool = True,
        host: str | None = None,
        fork_wait_s: float = 60.0,
        node_copy: Callable[[PodRecord, str, int], WeightsPlan | None] | None = None,
    ) -> None:
        self._instances = instances
        # A copy on the pod's own node, for pods on other hosts (Kubernetes: node_placement).
        self.node_copy = node_copy
        self.dram = dram
        self.fork = fork
        self.host = host or socket.gethostname()
        self.fork_wait_s = fork_wait_s
        # Fork sources (addresses) -> targets streaming from them now.
        self.forks_from: Counter[str] = Counter()
        # (host, model) -> set when the fork to that host ends.
        self._forks_to: dict[tuple[str, str], asyncio.Event] = {}
        self.plans: Counter[WeightsSource] = Counter()

    def _dram_copy(self, pod: PodRecord, model: str, tp_size: int) -> WeightsPlan | None:
        if self.node_copy is not None and (on_node := self.node_copy(pod, model, tp_size)):
            return on_node
        if self.dram is None or pod.host != self.host:
            return None
        entry = self.dram.find(model, tp_size)
        if entry is None:
            return None
        return WeightsPlan(WeightsSource.DRAM, path=str(entry.path))

    def _fork_source(self, pod: PodRecord, model: str) -> InstanceRecord | None:
        sources = [
            i
            for i in self._instances().values()
            if i.model == model
            and i.tensor_parallel_size == 1
            and i.pod_id != pod.pod_id
            and i.address
        ]
        if not sources:
            return None
        return min(sources, key=lambda i: (self.forks_from[i.address], i.registered_at))

    @contextlib.asynccontextmanager
    async def plan(
        self, pod: PodRecord, model: str, tp_size: int = 1
    ) -> AsyncIterator[WeightsPlan]:
        """The plan for one load; hold it until the load ends (it counts forks in flight)."""
        chosen = self._dram_copy(pod, model, tp_size)
        key = (pod.host, model)
        if chosen is None and self.dram is not None and key in self._forks_to:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._forks_to[key].wait(), self.fork_wait_s)
            chosen = self._dram_copy(pod, model, tp_size)
        source = None
        if chosen is None and self.fork and tp_size == 1:
            source = self._fork_source(pod, model)
            if source is not None:
                chosen = WeightsPlan(WeightsSource.FORK, fork_from=source.address)
        if chosen is None:
            chosen = WeightsPlan()
        self.plans[chosen.source] += 1
        done: asyncio.Event | None = None
        if source is not None:
            self.forks_from[source.address] += 1
            if key not in self._forks_to:
                done = self._forks_to[key] = asyncio.Event()
        try:
            yield chosen
        finally:
            if source is not None:
                self.forks_from[source.address] -= 1
                if self.forks_from[source.address] <= 0:
                    del self.forks_from[source.address]
            if done is not None:
                done.set()
                self._forks_to.pop(key, None)

    def stats(self) -> dict[str, Any]:
        return {
            "plans": {k.value or "pod": v for k, v in self.plans.items()},
            "forks_in_flight": sum(self.forks_from.values()),
        }
