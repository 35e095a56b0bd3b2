"""The pod record's two writers, the pod itself and podpool, both compare-and-swap (real etcd):
the pod's own changes keep a claim it has not seen, never revive a pod being ended, and a new
process takes over a stale record under its own lease."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from deepserve import records
from deepserve.flowserve.pod.registration import PodRegistration
from deepserve.records import PodRecord, PodState, Role
from deepserve.store.etcd import EtcdStore, TypedPrefix

pytestmark = pytest.mark.timeout(60)


@pytest_asyncio.fixture
async def etcd(etcd_endpoint: str) -> AsyncIterator[EtcdStore]:
    async with EtcdStore(etcd_endpoint) as store:
        yield store


@pytest_asyncio.fixture
async def pod(etcd: EtcdStore) -> AsyncIterator[PodRegistration]:
    registration = PodRegistration(etcd, "", "127.0.0.1:1", ttl_s=5, device="cpu")
    await registration.register()
    yield registration
    await registration.close()


async def pool_marks(pods: TypedPrefix[PodRecord], pod_id: str, **changes: object) -> None:
    """What podpool does (claim, end): a CAS on the record as it read it."""
    found = await pods.get(pod_id)
    assert found is not None
    await pods.compare_and_swap(
        pod_id,
        found.record.model_copy(update=changes),
        found.mod_revision,
        lease_id=found.lease_id or None,
    )


async def test_the_pods_own_change_keeps_the_pools_claim(
    etcd: EtcdStore, pod: PodRegistration
) -> None:
    pods = records.pods(etcd)
    pod_id = pod.pod.pod_id
    await pool_marks(pods, pod_id, state=PodState.ASSIGNED, task_id="task-1", model="m")
    # The pod's cached record still says warm with no task; its change must not undo the claim.
    await pod.set_pod(model="m", role=Role.COLOCATED)
    found = await pods.get(pod_id)
    assert found is not None and pod.lease is not None
    assert (found.record.state, found.record.task_id) == (PodState.ASSIGNED, "task-1")
    assert found.lease_id == pod.lease.id
    assert pod.pod == found.record


async def test_a_change_the_pools_claim_already_made_is_not_written_again(
    etcd: EtcdStore, pod: PodRegistration
) -> None:
    pods = records.pods(etcd)
    pod_id = pod.pod.pod_id
    await pool_marks(pods, pod_id, state=PodState.ASSIGNED, task_id="task-1", model="m")
    claimed = await pods.get(pod_id)
    assert claimed is not None
    # LoadModel's own "assigned to task-1 for m": the record already says so.
    await pod.set_pod(state=PodState.ASSIGNED, model="m", task_id="task-1")
    after = await pods.get(pod_id)
    assert after is not None and after.mod_revision == claimed.mod_revision
    assert pod.pod == claimed.record
    # A real change is still written.
    await pod.set_pod(state=PodState.WARM, model="", task_id="")
    after = await pods.get(pod_id)
    assert after is not None and after.record.state == PodState.WARM
    assert after.mod_revision > claimed.mod_revision


async def test_a_pod_being_ended_stays_terminating(etcd: EtcdStore, pod: PodRegistration) -> None:
    pods = records.pods(etcd)
    await pool_marks(pods, pod.pod.pod_id, state=PodState.TERMINATING)
    await pod.set_pod(state=PodState.WARM, model="", task_id="")
    found = await pods.get(pod.pod.pod_id)
    assert found is not None and found.record.state == PodState.TERMINATING


async def test_a_new_process_takes_over_a_stale_record(etcd: EtcdStore) -> None:
    pods = records.pods(etcd)
    pod_id = f"pod-{uuid.uuid4().hex[:10]}"
    old_lease = await etcd.grant_lease(30)
    stale = PodRecord(
        pod_id=pod_id, state=PodState.ASSIGNED, address="127.0.0.1:2", host="h", pid=1
    )
    await pods.create(pod_id, stale, lease_id=old_lease.id)
    registration = PodRegistration(etcd, pod_id, "127.0.0.1:3", ttl_s=5, device="cpu")
    try:
        await registration.register()
        found = await pods.get(pod_id)
        assert found is not None and registration.lease is not None
        assert found.record.address == "127.0.0.1:3" and found.record.state == PodState.WARM
        assert found.lease_id == registration.lease.id
    finally:
        await registration.close()
        await old_lease.revoke()


async def test_the_record_names_the_backend_that_started_the_pod(etcd: EtcdStore) -> None:
    # A pod of the Kubernetes backend says so (its pod template sets DEEPSERVE_FLOWSERVE_BACKEND);
    # the local backend, which reads only "local" records of its host, leaves it alone.
    registration = PodRegistration(
        etcd, "", "127.0.0.1:1", ttl_s=5, device="cpu", backend="kubernetes"
    )
    await registration.register()
    try:
        found = await records.pods(etcd).get(registration.pod.pod_id)
        assert found is not None and found.record.backend == "kubernetes"
    finally:
        await registration.close()
    default = PodRegistration(etcd, "", "127.0.0.1:1", ttl_s=5, device="cpu")
    assert default.pod.backend == "local"
