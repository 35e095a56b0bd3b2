"""Where pods come from: the interface every pod backend implements.

A pod is a process or container that runs one FlowServe shell: it has an address and registers
itself in etcd under its own lease (so the pool learns of it, and of its death, by watch). The
backend only starts and ends pods; everything the pool knows about a pod comes from etcd.
"""

from __future__ import annotations

from typing import Protocol

from deepserve.records import PodRecord


class PodBackend(Protocol):
    """Starts and ends pods; the local backend runs processes, a Kubernetes one would run Pods."""

    name: str

    def check_model(self, model: str) -> None:
        """Raises InvalidArgument/NotFound when no pod of this backend could load `model`, so a
        bad deployment fails fast instead of claiming pods to find out."""
        ...

    async def create_pod(self, pod_id: str) -> None:
        """Starts a pod that registers itself as `pod_id` (warm, no model) once its runtime is up."""
        ...

    def is_starting(self, pod_id: str) -> bool:
        """Whether a pod this backend started is still alive (registered or not)."""
        ...

    def started_here(self, pod_id: str) -> bool:
        """Whether this backend started `pod_id` (only such pods are trimmed from the pool)."""
        ...

    async def delete_pod(self, pod: PodRecord) -> None:
        """Ends the pod; its lease (and so its records) vanish with it."""
        ...

    def reap(self) -> list[str]:
        """Forgets started pods that have ended; returns their ids."""
        ...

    def warm_unevenly_spread(self) -> bool:
        """Whether a host that can run pods has none warm or starting while another has two or
        more warm (a host that came back, or joined, after the pool filled up elsewhere)."""
        ...

    async def close(self) -> None:
        """Ends every pod this backend started."""
        ...
