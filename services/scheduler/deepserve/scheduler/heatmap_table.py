"""The heatmaps in etcd (one per profiled model), mirrored in memory; the default otherwise."""

from __future__ import annotations

from deepserve.scheduler.heatmap import DEFAULT_HEATMAP, HeatmapRecord, heatmaps
from deepserve.store.etcd import EtcdStore
from deepserve.store.informer import Informer


class HeatmapTable:
    """model -> its stored heatmap, falling back to the shipped default."""

    def __init__(self, store: EtcdStore | None, default: HeatmapRecord = DEFAULT_HEATMAP) -> None:
        self.default = default
        self._informer = Informer(heatmaps(store)) if store is not None else None
        self._local: dict[str, HeatmapRecord] = {}

    def start(self) -> None:
        if self._informer is not None:
            self._informer.start()

    async def stop(self) -> None:
        if self._informer is not None:
            await self._informer.stop()

    @property
    def informer(self) -> Informer[HeatmapRecord] | None:
        return self._informer

    def set(self, record: HeatmapRecord) -> None:
        """Overrides a model's heatmap in this process only (tests, benchmarks)."""
        self._local[record.model] = record

    def for_model(self, model: str) -> HeatmapRecord:
        found = self._local.get(model)
        if found is None and self._informer is not None:
            found = self._informer.items.get(model)
        return found or self.default
