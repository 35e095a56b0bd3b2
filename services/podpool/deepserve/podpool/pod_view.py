"""Podpool's view of the pods registered in etcd, kept current by a watch."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from deepserve import records
from deepserve.records import PodRecord, PodState
from deepserve.store.etcd import EtcdStore, TypedPrefix
from deepserve.store.informer import Informer

log = logging.getLogger(__name__)


class PodView:
    """Every live pod by id (a pod's key vanishes with its lease when the process dies)."""

    def __init__(self, store: EtcdStore) -> None:
        self.records: TypedPrefix[PodRecord] = records.pods(store)
        self._informer = Informer(self.records)
        self._informer.add_handler(self._on_change)
        # Set on every change, so loops that act on pods wake without polling.
        self.changed = asyncio.Event()

    @property
    def ready(self) -> asyncio.Event:
        return self._informer.ready

    def start(self) -> None:
        self._informer.start()

    def add_handler(self, handler: Callable[[str, str, PodRecord | None], None]) -> None:
        """Calls handler(kind, pod_id, record) on every change (kind "put" or "delete")."""
        self._informer.add_handler(handler)

    async def stop(self) -> None:
        await self._informer.stop()

    def get(self, pod_id: str) -> PodRecord | None:
        return self._informer.items.get(pod_id)

    def list(self, state: PodState | None = None) -> list[PodRecord]:
        pods = sorted(self._informer.items.values(), key=lambda p: p.pod_id)
        return [p for p in pods if state is None or p.state == state]

    async def wait_for(
        self, predicate: Callable[[dict[str, PodRecord]], bool], timeout_s: float
    ) -> bool:
        return await self._informer.wait_for(predicate, timeout_s)

    def _on_change(self, kind: str, pod_id: str, record: PodRecord | None) -> None:
        self.changed.set()
        fields = {"pod_id": pod_id, "state": record.state.value if record else "gone"}
        log.info("pod %s", "updated" if kind == "put" else "removed", extra={"fields": fields})
