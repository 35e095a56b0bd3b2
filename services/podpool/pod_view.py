"""Podpool's view of the pods registered in etcd, kept current by a watch."""

from __future__ import annotations

import logging

from deepserve import records
from deepserve.records import PodRecord, PodState
from deepserve.store.etcd import EtcdStore
from deepserve.store.informer import Informer

log = logging.getLogger(__name__)


class PodView:
    """Every live pod by id (a pod's key vanishes with its lease when the process dies)."""

    def __init__(self, store: EtcdStore) -> None:
        self._informer = Informer(records.pods(store))
        self._informer.add_handler(self._log_change)

    def start(self) -> None:
        self._informer.start()

    async def stop(self) -> None:
        await self._informer.stop()

    def list(self, state: PodState | None = None) -> list[PodRecord]:
        pods = sorted(self._informer.items.values(), key=lambda p: p.pod_id)
        return [p for p in pods if state is None or p.state == state]

    @staticmethod
    def _log_change(kind: str, pod_id: str, record: PodRecord | None) -> None:
        fields = {"pod_id": pod_id, "state": record.state.value if record else "gone"}
        log.info("pod %s", "updated" if kind == "put" else "removed", extra={"fields": fields})
