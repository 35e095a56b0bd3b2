"""The jobmgr control loop: campaign for leadership, then reconcile whenever anything changes.

Of several jobmgr replicas exactly one leads (etcd election under a lease); only the leader
reconciles. Watches on jobs, tasks, pods and instances only *wake* the loop (level-triggered);
a full pass also runs every `resync_interval_s`. When the leader dies its lease expires and
the next candidate takes over within the election TTL; losing the lease stops the loop's
background operations at once so two leaders never act together for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Protocol

from deepserve import records
from deepserve.background import stop_task
from deepserve.jobmgr.autoscaler_loop import Autoscaler
from deepserve.jobmgr.pod_provider import PodProvider
from deepserve.jobmgr.reconciler import Reconciler
from deepserve.jobmgr.task_store import TaskStore
from deepserve.jobs.store import JobStore
from deepserve.store.election import LeaderElection
from deepserve.store.etcd import EtcdStore
from deepserve.store.informer import Informer
from deepserve.store.keys import Keys

log = logging.getLogger(__name__)

ELECTION_NAME = "jobmgr"


class Workload(Protocol):
    """A controller of another job kind (fine-tuning, batch) run by the leader's loop."""

    wake: asyncio.Event

    async def reconcile(self) -> None: ...

    async def stop(self) -> None: ...


class JobController:
    """Leader-elected reconcile loop of one jobmgr replica."""

    def __init__(
        self,
        store: EtcdStore,
        pods: PodProvider,
        *,
        candidate_id: str,
        election_ttl_s: int = 5,
        resync_interval_s: float = 5.0,
        acquire_timeout_s: float = 300.0,
        backoff_s: float = 1.0,
        backoff_max_s: float = 30.0,
        autoscaler: Autoscaler | None = None,
        workloads: Sequence[Workload] = (),
    ) -> None:
        self._store = store
        self.workloads = list(workloads)
        # Runs only while this replica leads, like the reconciler.
        self.autoscaler = autoscaler
        self.candidate_id = candidate_id
        self._election_ttl_s = election_ttl_s
        self._resync_interval_s = resync_interval_s
        self.pod_mirror = Informer(records.pods(store))
        self.instance_mirror = Informer(records.instances(store))
        self.reconciler = Reconciler(
            JobStore(store),
            TaskStore(store),
            pods,
            self.pod_mirror,
            self.instance_mirror,
            actor=candidate_id,
            acquire_timeout_s=acquire_timeout_s,
            backoff_s=backoff_s,
            backoff_max_s=backoff_max_s,
        )
        self.election: LeaderElection | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    @property
    def is_leader(self) -> bool:
        return self.election is not None and self.election.is_leader

    def start(self) -> None:
        for mirror in (self.pod_mirror, self.instance_mirror):
            mirror.add_handler(self._on_change)
            mirror.start()
        if self.autoscaler is not None:
            self.autoscaler.start()
        self._task = asyncio.create_task(self._run(), name="jobmgr-controller")

    async def stop(self) -> None:
        await stop_task(self._task)
        await self._stop_operations()
        for mirror in (self.pod_mirror, self.instance_mirror):
            await mirror.stop()
        if self.autoscaler is not None:
            await self.autoscaler.stop()
        if self.election is not None:
            with contextlib.suppress(Exception):
                await self.election.resign()

    async def _run(self) -> None:
        while True:
            election = LeaderElection(
                self._store, ELECTION_NAME, self.candidate_id, self._election_ttl_s
            )
            self.election = election
            try:
                await election.campaign()
                log.info("leading", extra={"fields": {"candidate": self.candidate_id}})
                await self._lead(election)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("controller failed; campaigning again")
                await asyncio.sleep(1.0)
            finally:
                await self._stop_operations()
            with contextlib.suppress(Exception):
                await election.resign()
            log.warning("lost leadership", extra={"fields": {"candidate": self.candidate_id}})

    async def _lead(self, election: LeaderElection) -> None:
        watchers = [
            asyncio.create_task(self._watch(Keys.jobs_prefix())),
            asyncio.create_task(self._watch(Keys.tasks_prefix())),
        ]
        if self.autoscaler is not None:
            watchers.append(asyncio.create_task(self.autoscaler.run(), name="jobmgr-autoscaler"))
        try:
            for mirror in (self.pod_mirror, self.instance_mirror):
                await mirror.ready.wait()
            while not election.deposed.is_set():
                self._wake.clear()
                self.reconciler.wake.clear()
                await self.reconciler.reconcile_all()
                for workload in self.workloads:
                    workload.wake.clear()
                    await workload.reconcile()
                timeout = self._resync_interval_s
                retry_in = self.reconciler.next_retry_in()
                if retry_in is not None:
                    timeout = min(timeout, retry_in + 0.05)
                await self._sleep(election, timeout)
        finally:
            for watcher in watchers:
                watcher.cancel()

    async def _sleep(self, election: LeaderElection, seconds: float) -> None:
        waiters = [
            asyncio.create_task(self._wake.wait()),
            asyncio.create_task(self.reconciler.wake.wait()),
            asyncio.create_task(election.deposed.wait()),
            *(asyncio.create_task(w.wake.wait()) for w in self.workloads),
        ]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _stop_operations(self) -> None:
        await self.reconciler.stop()
        for workload in self.workloads:
            await workload.stop()

    def _on_change(self, *_: object) -> None:
        self._wake.set()

    async def _watch(self, prefix: str) -> None:
        _, revision = await self._store.list(prefix)
        async for _event in self._store.watch_prefix(prefix, start_revision=revision + 1):
            self._wake.set()
