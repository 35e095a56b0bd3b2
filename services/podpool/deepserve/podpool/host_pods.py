"""The pods of one host, run for a podpool elsewhere: what a host agent does (no gRPC here).

The agent starts pods with this host's local backend (processes, or forks of a zygote), ends
them on request, and, since it runs beside them, deregisters any pod of this host whose process
exits (a pidfd each, `PodExitWatcher`), so a dead pod leaves routing at once, not a lease later.
"""

from __future__ import annotations

import logging

from deepserve.errors import InvalidArgument
from deepserve.podpool.local_backend import LocalProcessBackend
from deepserve.podpool.settings import PodPoolSettings
from deepserve.podpool.zygote_backend import ZygoteBackend
from deepserve.records import PodRecord, PodState

log = logging.getLogger(__name__)


def make_local_backend(settings: PodPoolSettings) -> LocalProcessBackend:
    """This host's pod starter: a process per pod, or forks of one zygote."""
    if settings.pod_start == "zygote":
        return ZygoteBackend(settings, settings.pod_start_timeout_s)
    return LocalProcessBackend(settings)


class HostPods:
    """Starts and ends the pods of this host."""

    def __init__(self, backend: LocalProcessBackend, host_name: str) -> None:
        self._backend = backend
        self.host_name = host_name

    async def prepare(self) -> None:
        """Before the agent registers: the pool's first CreatePod then starts a pod at once
        (a zygote imports the runtime first, which takes seconds to minutes)."""
        await self._backend.prepare()

    async def create(self, pod_id: str) -> None:
        if not pod_id:
            raise InvalidArgument("a pod id is required", field="pod_id")
        if self._backend.is_starting(pod_id):
            return  # a retried call: that pod runs already
        await self._backend.create_pod(pod_id)

    async def delete(self, pod_id: str, pid: int = 0) -> None:
        """Ends `pod_id`: one this agent started, or, given its pid, one an earlier agent of
        this host started (adopted after a restart)."""
        if not pod_id:
            raise InvalidArgument("a pod id is required", field="pod_id")
        if pid < 0:
            raise InvalidArgument("a pid is positive (or 0: unknown)", field="pid")
        await self._backend.delete_pod(
            PodRecord(
                pod_id=pod_id,
                state=PodState.TERMINATING,
                address="",
                host=self.host_name,
                pid=pid,
                backend=self._backend.name,
            )
        )

    def alive(self) -> list[str]:
        """Pods this agent started whose process still runs."""
        self._backend.reap()
        return sorted(p for p in self._backend.started() if self._backend.is_starting(p))

    async def close(self) -> None:
        await self._backend.close()
