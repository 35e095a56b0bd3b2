"""A pod of this host that exits is deregistered at once, not when its lease expires.

A pod's records (its pod record and its instance) live on its lease, so a pod that is killed
stays registered until the lease expires, up to the lease TTL. Podpool runs on the pods' host
and can see a process end: it watches every local pod's pid through a pidfd (any pod on this
host, whoever started it: podpool itself, its zygote, a podpool before a restart) and, when the
process is gone, revokes the pod's lease. That deletes its records, so jobmgr replaces the
instance, and the scheduler and gateways drop it, within moments of the death instead of a TTL
later. Process exit is as certain a sign of death as an expired lease; the lease stays the
fallback (a pod on a host no podpool watches, or one that died while podpool was down).

A pod that exits cleanly has revoked its lease itself; revoking it again finds nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os

from prometheus_client import Counter

from deepserve import records
from deepserve.background import stop_tasks
from deepserve.metrics import registry
from deepserve.podpool.pod_view import PodView
from deepserve.records import PodRecord
from deepserve.store.etcd import EtcdStore

log = logging.getLogger(__name__)

POD_EXITS = Counter(
    "deepserve_podpool_pod_exits",
    "Local pod processes seen exiting, by whether their registration was still there to remove "
    "(deregistered) or already gone (clean: the pod revoked its lease itself, or it expired)",
    ["outcome"],
    registry=registry(),
)


class PodExitWatcher:
    """Watches the processes of this host's pods; revokes the lease of each one that exits."""

    def __init__(self, view: PodView, etcd: EtcdStore, host: str, backend: str = "local") -> None:
        self._view = view
        self._etcd = etcd
        self._host = host
        self._backend = backend
        # pod id -> (pid, pidfd)
        self._watched: dict[str, tuple[int, int]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._view.add_handler(self._on_change)
        for pod in self._view.list():
            self._watch(pod)

    async def stop(self) -> None:
        for pod_id in list(self._watched):
            self._unwatch(pod_id)
        await stop_tasks(list(self._tasks))

    @property
    def watched(self) -> dict[str, int]:
        return {pod_id: pid for pod_id, (pid, _) in self._watched.items()}

    def _on_change(self, kind: str, pod_id: str, record: PodRecord | None) -> None:
        if kind == "put" and record is not None:
            self._watch(record)
        else:
            self._unwatch(pod_id)

    def _watch(self, pod: PodRecord) -> None:
        if pod.host != self._host or pod.backend != self._backend or pod.pid <= 0:
            return
        current = self._watched.get(pod.pod_id)
        if current is not None:
            if current[0] == pod.pid:
                return
            self._unwatch(pod.pod_id)
        try:
            fd = os.pidfd_open(pod.pid)
        except ProcessLookupError:
            self._exited(pod.pod_id, pod.pid)  # died before we looked
            return
        except OSError as exc:  # no pidfd here (old kernel): the lease alone tells
            log.debug("cannot watch pod %s (pid %d): %s", pod.pod_id, pod.pid, exc)
            return
        assert self._loop is not None
        self._watched[pod.pod_id] = (pod.pid, fd)
        self._loop.add_reader(fd, self._exited, pod.pod_id, pod.pid)

    def _unwatch(self, pod_id: str) -> None:
        entry = self._watched.pop(pod_id, None)
        if entry is None:
            return
        _, fd = entry
        assert self._loop is not None
        self._loop.remove_reader(fd)
        os.close(fd)

    def _exited(self, pod_id: str, pid: int) -> None:
        self._unwatch(pod_id)
        task = asyncio.ensure_future(self._deregister(pod_id, pid))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deregister(self, pod_id: str, pid: int) -> None:
        try:
            found = await records.pods(self._etcd).get(pod_id)
            if found is None or found.record.pid != pid or not found.lease_id:
                POD_EXITS.labels("clean").inc()
                return
            removed = await self._etcd.revoke_lease(found.lease_id)
        except Exception as exc:  # the lease still expires on its own
            log.warning("deregistering exited pod %s failed: %s", pod_id, exc)
            return
        POD_EXITS.labels("deregistered" if removed else "clean").inc()
        if removed:
            log.warning(
                "pod process exited; its registration is removed now, not at lease expiry",
                extra={"fields": {"pod_id": pod_id, "pid": pid}},
            )
