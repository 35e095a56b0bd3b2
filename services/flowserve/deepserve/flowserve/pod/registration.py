"""The pod's own registration: a `PodRecord` (and, once serving, an `InstanceRecord`) in etcd,
both attached to one keep-alive lease, so a killed process vanishes from etcd within the TTL."""

from __future__ import annotations

import logging
import os
import socket
import uuid

from deepserve import records
from deepserve.records import InstanceRecord, PodRecord, PodState
from deepserve.store.etcd import EtcdStore, KeepAliveLease

log = logging.getLogger(__name__)


def new_pod_id() -> str:
    return f"pod-{uuid.uuid4().hex[:10]}"


class PodRegistration:
    """Writes this process's pod and instance records under its lease."""

    def __init__(
        self, store: EtcdStore, pod_id: str, address: str, ttl_s: int, device: str
    ) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.pod = PodRecord(
            pod_id=pod_id or new_pod_id(),
            state=PodState.WARM,
            address=address,
            host=socket.gethostname(),
            pid=os.getpid(),
            device=device,
        )
        self.instance: InstanceRecord | None = None
        self.lease: KeepAliveLease | None = None
        self._pods = records.pods(store)
        self._instances = records.instances(store)

    async def register(self) -> None:
        self.lease = await self.store.grant_lease(self.ttl_s)
        await self._pods.put(self.pod.pod_id, self.pod, lease_id=self.lease.id)
        log.info("pod registered", extra={"fields": {"pod_id": self.pod.pod_id, "state": "warm"}})

    async def set_pod(self, **changes: object) -> None:
        assert self.lease is not None
        self.pod = self.pod.model_copy(update=changes)
        await self._pods.put(self.pod.pod_id, self.pod, lease_id=self.lease.id)

    async def register_instance(self, instance: InstanceRecord) -> None:
        """Makes the instance visible to schedulers (the paper's scale-up step 5)."""
        assert self.lease is not None
        self.instance = instance
        await self._instances.put(instance.instance_id, instance, lease_id=self.lease.id)
        log.info(
            "instance registered",
            extra={"fields": {"instance_id": instance.instance_id, "model": instance.model}},
        )

    async def deregister_instance(self) -> None:
        if self.instance is not None:
            await self._instances.delete(self.instance.instance_id)
            self.instance = None

    async def close(self) -> None:
        if self.lease is not None:
            await self.lease.revoke()  # deletes the pod and instance keys at once
            self.lease = None
