"""Registers a service process in etcd under a lease, so a dead process disappears by itself."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid

from deepserve import records
from deepserve.background import stop_task
from deepserve.store.etcd import EtcdStore, KeepAliveLease

log = logging.getLogger(__name__)


def new_process_id(service: str) -> str:
    return f"{service}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


class ServiceRegistration:
    """A `ServiceRecord` held alive by a keep-alive lease; re-registers if the lease is lost."""

    def __init__(self, store: EtcdStore, record: records.ServiceRecord, ttl_s: int) -> None:
        self.store = store
        self.record = record
        self.ttl_s = ttl_s
        self.lease: KeepAliveLease | None = None
        self._rejoin: asyncio.Task[None] | None = None

    @classmethod
    async def register(
        cls,
        store: EtcdStore,
        service: str,
        address: str,
        ttl_s: int,
        http_address: str = "",
        metrics_address: str = "",
    ) -> ServiceRegistration:
        host = address.rsplit(":", 1)[0]
        record = records.ServiceRecord(
            service=service,
            process_id=new_process_id(service),
            address=address,
            http_address=http_address,
            metrics_address=metrics_address,
            pid=os.getpid(),
            host=host,
        )
        reg = cls(store, record, ttl_s)
        await reg._put()
        return reg

    async def _put(self) -> None:
        self.lease = await self.store.grant_lease(self.ttl_s)
        await records.services(self.store, self.record.service).put(
            self.record.process_id, self.record, lease_id=self.lease.id
        )
        self.lease.on_lost(self._on_lost)

    def _on_lost(self) -> None:
        # Cut off from etcd past the TTL: the record is gone. Put it back, under the same
        # process id (one record per process, never a duplicate), once etcd answers again.
        if self._rejoin is None or self._rejoin.done():
            self._rejoin = asyncio.create_task(self._register_again())

    async def _register_again(self) -> None:
        while True:
            try:
                # Bounded: while the link is still cut the call would hang (a lease granted by
                # a timed-out try expires by itself).
                await asyncio.wait_for(self._put(), timeout=max(self.ttl_s, 2))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("re-registering %s failed: %s", self.record.process_id, exc)
                await asyncio.sleep(1.0)
                continue
            log.warning(
                "service registration lost and restored",
                extra={"fields": {"process_id": self.record.process_id}},
            )
            return

    async def close(self) -> None:
        await stop_task(self._rejoin)
        if self.lease is not None:
            await self.lease.revoke()
