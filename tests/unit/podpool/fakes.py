"""Simulated pods for podpool tests: real etcd records under real leases, no processes."""

from __future__ import annotations

import asyncio
import socket

from deepserve import records
from deepserve.errors import FailedPrecondition, NotFound, Unavailable
from deepserve.podpool.pod_agent import LoadResult
from deepserve.records import PodRecord, PodState, Role
from deepserve.scaling.weights_plan import WeightsPlan
from deepserve.store.etcd import EtcdStore, KeepAliveLease


class FakeBackend:
    """Each 'pod' is a PodRecord kept alive by its own lease; ending it revokes the lease."""

    name = "fake"

    def __init__(self, store: EtcdStore, *, start_delay_s: float = 0.05, ttl_s: int = 10) -> None:
        self.store = store
        self.start_delay_s = start_delay_s
        # Generous: a loaded CI machine can stall keep-alives for seconds; kill() revokes the
        # lease at once, so no test waits for the TTL.
        self.ttl_s = ttl_s
        self.leases: dict[str, KeepAliveLease] = {}
        self.created: list[str] = []
        self.deleted: list[str] = []
        self.unknown_models: set[str] = set()
        # What warm_unevenly_spread answers (a test plays a host that came back).
        self.uneven = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def create_pod(self, pod_id: str) -> None:
        self.created.append(pod_id)
        lease = await self.store.grant_lease(self.ttl_s)
        self.leases[pod_id] = lease
        task = asyncio.create_task(self._register(pod_id, lease))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _register(self, pod_id: str, lease: KeepAliveLease) -> None:
        await asyncio.sleep(self.start_delay_s)  # "importing torch"
        record = PodRecord(
            pod_id=pod_id,
            state=PodState.WARM,
            address=f"fake-{pod_id}:1",
            host=socket.gethostname(),
            pid=0,
            backend=self.name,
        )
        await records.pods(self.store).put(pod_id, record, lease_id=lease.id)

    def check_model(self, model: str) -> None:
        if model in self.unknown_models:
            raise NotFound(f"no model {model}", field="model")

    def is_starting(self, pod_id: str) -> bool:
        return pod_id in self.leases

    def started_here(self, pod_id: str) -> bool:
        return pod_id in self.leases

    def reap(self) -> list[str]:
        return []

    def warm_unevenly_spread(self) -> bool:
        return self.uneven

    async def delete_pod(self, pod: PodRecord) -> None:
        self.deleted.append(pod.pod_id)
        lease = self.leases.pop(pod.pod_id, None)
        if lease is not None:
            await lease.revoke()

    async def kill(self, pod_id: str) -> None:
        """The process dies: its lease goes (immediately, instead of after the TTL)."""
        lease = self.leases.pop(pod_id)
        await lease.revoke()

    async def close(self) -> None:
        for pod_id in list(self.leases):
            await self.kill(pod_id)


class FakeAgent:
    """Plays the pod's shell: LoadModel marks the pod assigned, UnloadModel makes it warm."""

    def __init__(self, store: EtcdStore) -> None:
        self.store = store
        self.fail_models: set[str] = set()
        self.hang_models: set[str] = set()
        self.loads: list[tuple[str, str]] = []
        self.unloads: list[str] = []
        self.plans: list[WeightsPlan | None] = []

    async def _pod_at(self, address: str) -> tuple[PodRecord, int]:
        for pod in (await records.pods(self.store).list())[0]:
            if pod.record.address == address:
                return pod.record, pod.lease_id
        raise FailedPrecondition(f"no pod at {address}")

    async def load(
        self,
        address: str,
        *,
        model: str,
        role: Role,
        job_id: str,
        task_id: str,
        tensor_parallel_size: int,
        weights: WeightsPlan | None = None,
    ) -> LoadResult:
        pod, lease_id = await self._pod_at(address)
        self.plans.append(weights)
        if model in self.fail_models:
            raise FailedPrecondition(f"cannot load {model}")
        if model in self.hang_models:
            raise Unavailable("pod did not answer")
        self.loads.append((pod.pod_id, task_id))
        updated = pod.model_copy(
            update={"state": PodState.ASSIGNED, "model": model, "role": role, "task_id": task_id}
        )
        await records.pods(self.store).put(pod.pod_id, updated, lease_id=lease_id)
        return LoadResult(f"inst-{task_id}", 0.01)

    async def unload(self, address: str) -> None:
        pod, lease_id = await self._pod_at(address)
        self.unloads.append(pod.pod_id)
        updated = pod.model_copy(update={"state": PodState.WARM, "model": "", "task_id": ""})
        await records.pods(self.store).put(pod.pod_id, updated, lease_id=lease_id)
