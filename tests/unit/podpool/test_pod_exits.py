"""A local pod that exits loses its registration at once: podpool revokes its lease.

Real etcd (the session fixture) and real processes standing in for pods: a pod record and an
instance record on a 60 s lease, like a pod's, for a process of this host.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import pytest

from deepserve import records
from deepserve.podpool.pod_exits import PodExitWatcher
from deepserve.podpool.pod_view import PodView
from deepserve.records import InstanceRecord, PodRecord, PodState, Role
from deepserve.store.etcd import EtcdStore, KeepAliveLease

# Far longer than any wait below: a record that vanishes was revoked, not expired.
LEASE_TTL_S = 60


@pytest.fixture
async def etcd(etcd_endpoint: str) -> AsyncIterator[EtcdStore]:
    async with EtcdStore(etcd_endpoint) as store:
        yield store


async def register(etcd: EtcdStore, pid: int, host: str = "") -> tuple[str, str, KeepAliveLease]:
    """Pod and instance records on one lease, as a pod registers itself."""
    lease = await etcd.grant_lease(LEASE_TTL_S)
    pod_id, instance_id = f"pod-{uuid.uuid4().hex[:8]}", f"inst-{uuid.uuid4().hex[:8]}"
    await records.pods(etcd).put(
        pod_id,
        PodRecord(
            pod_id=pod_id,
            state=PodState.ASSIGNED,
            address="127.0.0.1:1",
            host=host or socket.gethostname(),
            pid=pid,
        ),
        lease_id=lease.id,
    )
    await records.instances(etcd).put(
        instance_id,
        InstanceRecord(
            instance_id=instance_id, model="m", role=Role.COLOCATED, address="x", pod_id=pod_id
        ),
        lease_id=lease.id,
    )
    return pod_id, instance_id, lease


async def gone(etcd: EtcdStore, pod_id: str, instance_id: str, timeout_s: float = 30) -> bool:
    for _ in range(int(timeout_s / 0.05)):
        if (
            await records.pods(etcd).get(pod_id) is None
            and await records.instances(etcd).get(instance_id) is None
        ):
            return True
        await asyncio.sleep(0.05)
    return False


def sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


async def test_a_killed_pod_is_deregistered_before_its_lease_could_expire(
    etcd: EtcdStore,
) -> None:
    view = PodView(etcd)
    watcher = PodExitWatcher(view, etcd, socket.gethostname())
    watcher.start()
    view.start()
    survivor, victim = sleeper(), sleeper()
    kept = await register(etcd, survivor.pid)
    pod_id, instance_id, lease = await register(etcd, victim.pid)
    try:
        assert await view.wait_for(lambda pods: pod_id in pods and kept[0] in pods, 10)
        for _ in range(100):
            if pod_id in watcher.watched:
                break
            await asyncio.sleep(0.02)
        assert watcher.watched[pod_id] == victim.pid
        victim.kill()
        victim.wait()
        assert await gone(etcd, pod_id, instance_id)
        # The live pod keeps its registration.
        assert await records.pods(etcd).get(kept[0]) is not None
        assert await records.instances(etcd).get(kept[1]) is not None
    finally:
        for proc in (survivor, victim):
            proc.kill()
            proc.wait()
        await watcher.stop()
        await view.stop()
        await kept[2].revoke()
        await lease.revoke()


async def test_a_pod_already_dead_when_seen_and_pods_of_other_hosts(etcd: EtcdStore) -> None:
    dead = sleeper()
    dead.kill()
    dead.wait()
    elsewhere = sleeper()
    pod_id, instance_id, lease = await register(etcd, dead.pid)
    remote = await register(etcd, elsewhere.pid, host="another-host")
    try:
        view = PodView(etcd)
        watcher = PodExitWatcher(view, etcd, socket.gethostname())
        watcher.start()
        view.start()
        try:
            # Listed after its death (e.g. by a podpool that restarted): deregistered too.
            assert await gone(etcd, pod_id, instance_id)
            # A pid on another host means nothing here: left to its lease.
            assert remote[0] not in watcher.watched
            assert await records.pods(etcd).get(remote[0]) is not None
        finally:
            await watcher.stop()
            await view.stop()
    finally:
        elsewhere.kill()
        elsewhere.wait()
        await lease.revoke()
        await remote[2].revoke()
