"""Per-node DRAM pre-loading, the pool's side: place a task on a node holding its weights.

Node agents publish which models each node keeps in DRAM (NodeWeightsRecord). When the pool
claims a warm pod it tries pods on such nodes first; when it must start a pod cold it asks the
Kubernetes scheduler to prefer such nodes (a preferred node affinity, never a requirement: a
task still gets a pod when no holding node has room); and a pod on such a node maps the copy
instead of forking or reading disk.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from deepserve import records
from deepserve.records import NodeWeightsRecord, PodRecord
from deepserve.scaling.timeline import WeightsSource
from deepserve.scaling.weights_plan import WeightsPlan
from deepserve.store.etcd import EtcdStore
from deepserve.store.informer import Informer


class NodeAwareBackend(Protocol):
    def node_of(self, pod_id: str) -> str: ...

    def prefer_nodes(self, pod_id: str, nodes: list[str]) -> None: ...


class NodePlacement:
    """Reads the nodes' weights records (watched) and steers claims, cold starts and loads."""

    def __init__(self, etcd: EtcdStore, backend: NodeAwareBackend) -> None:
        self._nodes: Informer[NodeWeightsRecord] = Informer(records.node_weights(etcd))
        self._backend = backend

    @property
    def ready(self) -> asyncio.Event:
        return self._nodes.ready

    def start(self) -> None:
        self._nodes.start()

    async def stop(self) -> None:
        await self._nodes.stop()

    def nodes_holding(self, model: str, tp_size: int = 1) -> list[str]:
        return sorted(n.node for n in self._nodes.items.values() if n.holds(model, tp_size))

    def order(self, candidates: list[PodRecord], model: str, tp_size: int = 1) -> list[PodRecord]:
        """Warm pods on nodes holding `model` first; the order is otherwise kept."""
        holding = set(self.nodes_holding(model, tp_size))
        return sorted(candidates, key=lambda p: self._backend.node_of(p.pod_id) not in holding)

    def before_cold_start(self, pod_id: str, model: str, tp_size: int = 1) -> None:
        self._backend.prefer_nodes(pod_id, self.nodes_holding(model, tp_size))

    def weights_plan(self, pod: PodRecord, model: str, tp_size: int = 1) -> WeightsPlan | None:
        """Map the copy on the pod's node, when its node holds one."""
        node = self._backend.node_of(pod.pod_id)
        record = self._nodes.items.get(node) if node else None
        if record is None:
            return None
        for copy in record.copies:
            if copy.model == model and copy.tensor_parallel_size == tp_size and copy.path:
                return WeightsPlan(WeightsSource.DRAM, path=copy.path)
        return None
