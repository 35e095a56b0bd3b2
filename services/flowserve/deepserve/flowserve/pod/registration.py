"""The pod's own registration: a `PodRecord` (and, once serving, an `InstanceRecord`) in etcd,
both attached to one keep-alive lease, so a killed process vanishes from etcd within the TTL.

The pod record has two writers, the pod and podpool (which claims, unclaims and ends pods),
so both compare-and-swap: the pod creates its record if absent and changes it with
`TypedPrefix.update`, never a blind put over a claim it has not seen.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable

from deepserve import records
from deepserve.errors import Conflict
from deepserve.records import InstanceRecord, PodRecord, PodState
from deepserve.store.etcd import EtcdStore, KeepAliveLease

log = logging.getLogger(__name__)


def new_pod_id() -> str:
    return f"pod-{uuid.uuid4().hex[:10]}"


class PodRegistration:
    """Writes this process's pod and instance records under its lease."""

    def __init__(
        self,
        store: EtcdStore,
        pod_id: str,
        address: str,
        ttl_s: int,
        device: str,
        host: str = "",
        backend: str = "local",
    ) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.pod = PodRecord(
            pod_id=pod_id or new_pod_id(),
            state=PodState.WARM,
            address=address,
            host=host or socket.gethostname(),
            pid=os.getpid(),
            backend=backend,
            device=device,
        )
        self.instance: InstanceRecord | None = None
        self.lease: KeepAliveLease | None = None
        self._pods = records.pods(store)
        self._instances = records.instances(store)

    async def register(self) -> None:
        self.lease = await self.store.grant_lease(self.ttl_s)
        try:
            await self._pods.create(self.pod.pod_id, self.pod, lease_id=self.lease.id)
        except Conflict:
            # A record under this id outlived an earlier process (its lease not yet expired):
            # take it over, by CAS, with this process's address and lease.
            await self._replace_stale()
        log.info("pod registered", extra={"fields": {"pod_id": self.pod.pod_id, "state": "warm"}})

    def on_lease_lost(self, callback: Callable[[], None]) -> None:
        """Calls `callback` once the lease is gone on the server (refreshes failed past the TTL,
        or etcd no longer knows it): the records are gone and jobmgr replaces the instance."""
        assert self.lease is not None
        self.lease.on_lost(callback)

    async def _replace_stale(self) -> None:
        assert self.lease is not None
        for _ in range(16):
            found = await self._pods.get(self.pod.pod_id)
            try:
                if found is None:
                    await self._pods.create(self.pod.pod_id, self.pod, lease_id=self.lease.id)
                else:
                    await self._pods.compare_and_swap(
                        self.pod.pod_id, self.pod, found.mod_revision, lease_id=self.lease.id
                    )
                return
            except Conflict:
                continue
        raise Conflict(f"pod {self.pod.pod_id}: too many concurrent writers")

    async def set_pod(self, **changes: object) -> None:
        """Applies `changes` to the record as it is in etcd now (podpool may have claimed or
        marked it since), by CAS; a pod the pool is ending stays terminating."""
        assert self.lease is not None

        def apply(current: PodRecord) -> PodRecord | None:
            if current.state == PodState.TERMINATING:
                return None
            if all(getattr(current, name) == value for name, value in changes.items()):
                return None  # already so (podpool's claim wrote it): no second write
            return current.model_copy(update=changes)

        self.pod = (await self._pods.update(self.pod.pod_id, apply)).record

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
