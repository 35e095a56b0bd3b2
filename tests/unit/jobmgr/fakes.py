"""A simulated pod pool for jobmgr tests: each grant writes a pod and an instance record under a
real etcd lease (as a FlowServe pod does), so killing a 'pod' is revoking its lease."""

from __future__ import annotations

import asyncio
import socket
import uuid

from deepserve import records
from deepserve.errors import FailedPrecondition
from deepserve.jobmgr.pod_provider import PodAsk, PodGrant
from deepserve.records import InstanceRecord, PodRecord, PodState
from deepserve.store.etcd import EtcdStore, KeepAliveLease


class FakePodProvider:
    """Grants pods instantly (the first `warm` of them warm, the rest cold)."""

    def __init__(self, store: EtcdStore, *, warm: int = 100, ttl_s: int = 2) -> None:
        self.store = store
        self.warm = warm
        self.ttl_s = ttl_s
        self.fail_models: set[str] = set()
        self.delay_s = 0.0
        self.leases: dict[str, KeepAliveLease] = {}
        self.acquired: list[PodAsk] = []
        self.released: list[tuple[str, bool]] = []

    async def acquire(self, ask: PodAsk) -> PodGrant:
        self.acquired.append(ask)
        await asyncio.sleep(self.delay_s)
        if ask.model in self.fail_models:
            raise FailedPrecondition(f"model {ask.model} failed to load")
        cold = self.warm <= 0
        self.warm -= 1
        pod_id = f"pod-{uuid.uuid4().hex[:6]}"
        address = f"fake-{pod_id}:1"
        lease = await self.store.grant_lease(self.ttl_s)
        self.leases[pod_id] = lease
        await records.pods(self.store).put(
            pod_id,
            PodRecord(
                pod_id=pod_id,
                state=PodState.ASSIGNED,
                address=address,
                host=socket.gethostname(),
                pid=0,
                model=ask.model,
                role=ask.role,
                task_id=ask.task_id,
            ),
            lease_id=lease.id,
        )
        instance_id = f"inst-{pod_id}"
        await records.instances(self.store).put(
            instance_id,
            InstanceRecord(
                instance_id=instance_id,
                model=ask.model,
                role=ask.role,
                address=address,
                pod_id=pod_id,
                job_id=ask.job_id,
                task_id=ask.task_id,
            ),
            lease_id=lease.id,
        )
        return PodGrant(pod_id, address, instance_id, cold, 0.01, 0.02)

    async def release(self, pod_id: str, *, terminate: bool = False) -> None:
        self.released.append((pod_id, terminate))
        await self.kill(pod_id)

    async def kill(self, pod_id: str) -> None:
        lease = self.leases.pop(pod_id, None)
        if lease is not None:
            await lease.revoke()

    async def close(self) -> None:
        for pod_id in list(self.leases):
            await self.kill(pod_id)
