"""The warm pod pool over a real etcd, with simulated pods (records under real leases)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from deepserve.errors import FailedPrecondition, NotFound, Unavailable
from deepserve.podpool.pod_view import PodView
from deepserve.podpool.warm_pool import PodRequest, WarmPodPool
from deepserve.records import PodPurpose, PodState, Role
from deepserve.store.etcd import EtcdStore
from deepserve.store.keys import Keys

from .fakes import FakeAgent, FakeBackend


@pytest.fixture
async def etcd(etcd_endpoint: str) -> AsyncIterator[EtcdStore]:
    async with EtcdStore(etcd_endpoint) as store:
        await store.delete_prefix(Keys.pods_prefix())
        yield store
        await store.delete_prefix(Keys.pods_prefix())


@pytest.fixture
async def make_pool(etcd: EtcdStore) -> AsyncIterator[Callable]:  # type: ignore[type-arg]
    made: list[tuple[WarmPodPool, PodView]] = []

    async def make(warm_target: int = 1, *, start: bool = True, **kw: object):  # type: ignore[no-untyped-def]
        view = PodView(etcd)
        view.start()
        await view.ready.wait()
        backend, agent = FakeBackend(etcd), FakeAgent(etcd)
        pool = WarmPodPool(view, backend, agent, warm_target=warm_target, **kw)  # type: ignore[arg-type]
        if start:
            pool.start()
        made.append((pool, view))
        return pool, backend, agent

    yield make
    for pool, view in made:
        await pool.close()
        await view.stop()


async def warm_count(pool: WarmPodPool, n: int, timeout_s: float = 10) -> None:
    ok = await pool.view.wait_for(
        lambda pods: sum(p.state == PodState.WARM for p in pods.values()) == n, timeout_s
    )
    assert ok, [(p.pod_id, p.state) for p in pool.view.list()]


def ask(task_id: str, model: str = "m") -> PodRequest:
    return PodRequest(task_id=task_id, model=model, role=Role.COLOCATED, job_id="j")


async def test_pool_fills_to_its_warm_target(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool, backend, _ = await make_pool(warm_target=2)
    await warm_count(pool, 2)
    await asyncio.sleep(0.3)
    assert len(backend.created) == 2  # no overshoot while pods start


async def test_acquire_hands_out_a_warm_pod_and_refills(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool, backend, agent = await make_pool(warm_target=1)
    await warm_count(pool, 1)
    warm = pool.view.list(PodState.WARM)[0]
    acquired = await pool.acquire(ask("t1"))
    assert acquired.pod.pod_id == warm.pod_id
    assert not acquired.cold_start
    assert acquired.instance_id == "inst-t1"
    assert agent.loads == [(warm.pod_id, "t1")]
    await warm_count(pool, 1)  # refilled in the background
    assert len(backend.created) == 2
    assert (pool.warm_hits, pool.cold_starts) == (1, 0)


async def test_a_training_claim_loads_nothing_and_registers_no_instance(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool, _, agent = await make_pool(warm_target=1)
    await warm_count(pool, 1)
    warm = pool.view.list(PodState.WARM)[0]
    training = PodRequest("t1", "m", Role.COLOCATED, "j", purpose=PodPurpose.TRAINING)
    acquired = await pool.acquire(training)
    assert acquired.pod.pod_id == warm.pod_id
    assert acquired.instance_id == ""
    assert agent.loads == []  # no serving engine beside the training run
    claimed = await pool.view.records.get(warm.pod_id)
    assert claimed is not None
    assert (claimed.record.state, claimed.record.task_id) == (PodState.ASSIGNED, "t1")
    assert await pool.release(warm.pod_id) in ("returned", "ended")


async def test_concurrent_loads_are_bounded_by_max_concurrent_loads(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool, _, agent = await make_pool(warm_target=4, max_concurrent_loads=2)
    await warm_count(pool, 4)
    running, most = 0, 0
    load = agent.load

    async def slow_load(*args: object, **kw: object):  # type: ignore[no-untyped-def]
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await asyncio.sleep(0.1)
            return await load(*args, **kw)
        finally:
            running -= 1

    agent.load = slow_load
    got = await asyncio.gather(*(pool.acquire(ask(f"t{i}")) for i in range(4)))
    assert len({a.pod.pod_id for a in got}) == 4
    assert most == 2


async def test_empty_pool_starts_a_pod_cold(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool, backend, _ = await make_pool(warm_target=0)
    acquired = await pool.acquire(ask("t1"))
    assert acquired.cold_start
    assert backend.created == [acquired.pod.pod_id]
    assert acquired.pod.state == PodState.ASSIGNED
    assert pool.cold_starts == 1


async def test_concurrent_acquires_never_share_a_pod(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool, _, _ = await make_pool(warm_target=2)
    await warm_count(pool, 2)
    got = await asyncio.gather(*(pool.acquire(ask(f"t{i}")) for i in range(4)))
    assert len({a.pod.pod_id for a in got}) == 4
    assert sorted(a.cold_start for a in got) == [False, False, True, True]


async def test_acquire_is_idempotent_per_task(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool, _, agent = await make_pool(warm_target=1)
    await warm_count(pool, 1)
    first = await pool.acquire(ask("t1"))
    await pool.view.wait_for(lambda pods: pods[first.pod.pod_id].task_id == "t1", timeout_s=5)
    again = await pool.acquire(ask("t1"))
    assert again.pod.pod_id == first.pod.pod_id
    assert [load[0] for load in agent.loads] == [first.pod.pod_id] * 2


async def test_refused_load_keeps_the_pod_and_a_silent_pod_is_ended(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool, backend, agent = await make_pool(warm_target=1)
    await warm_count(pool, 1)
    agent.fail_models.add("broken")
    pod_id = pool.view.list(PodState.WARM)[0].pod_id
    with pytest.raises(FailedPrecondition):
        await pool.acquire(ask("t1", model="broken"))
    await warm_count(pool, 1)
    assert pool.view.list(PodState.WARM)[0].pod_id == pod_id  # back in the pool
    assert pod_id not in backend.deleted
    agent.hang_models.add("hangs")
    with pytest.raises(Unavailable):
        await pool.acquire(ask("t2", model="hangs"))
    assert pod_id in backend.deleted


async def test_an_unknown_model_fails_before_any_pod_is_touched(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool, backend, agent = await make_pool(warm_target=1)
    await warm_count(pool, 1)
    backend.unknown_models.add("nope")
    with pytest.raises(NotFound):
        await pool.acquire(ask("t1", model="nope"))
    assert agent.loads == []
    assert len(backend.created) == 1  # only the warm pod


async def test_release_returns_to_the_pool_or_ends_the_pod(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool, backend, agent = await make_pool(warm_target=1, start=False)
    await backend.create_pod("pod-a")
    await backend.create_pod("pod-b")
    await warm_count(pool, 2)
    a = await pool.acquire(ask("ta"))
    b = await pool.acquire(ask("tb"))
    # The pool has no warm pod: the first release returns its pod (unload), the next ends its.
    assert await pool.release(a.pod.pod_id) == "returned"
    assert agent.unloads == [a.pod.pod_id]
    await warm_count(pool, 1)
    assert await pool.release(b.pod.pod_id) == "ended"
    assert b.pod.pod_id in backend.deleted
    assert await pool.release(b.pod.pod_id) in ("gone", "ended")
    assert await pool.release("pod-never-existed") == "gone"


async def test_surplus_warm_pods_this_pool_started_are_trimmed(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool, backend, _ = await make_pool(warm_target=1, start=False)
    for name in ("pod-1", "pod-2", "pod-3"):
        await backend.create_pod(name)
    await warm_count(pool, 3)
    await pool.refill_once()
    await warm_count(pool, 1)
    assert len(backend.deleted) == 2


async def test_a_surplus_pod_claimed_before_it_is_trimmed_is_kept(make_pool) -> None:  # type: ignore[no-untyped-def]
    """Trimming counts the surplus, then ends pods one by one: a claim can win a counted
    pod in between, and that pod must keep loading, not be ended under its task."""
    pool, backend, _ = await make_pool(warm_target=1, start=False)
    for name in ("pod-1", "pod-2"):
        await backend.create_pod(name)
    await warm_count(pool, 2)
    counted = pool.view.list(PodState.WARM)  # the trim's view of the surplus
    claimed = await pool.acquire(ask("t1"))
    taken = next(p for p in counted if p.pod_id == claimed.pod.pod_id)
    await pool._end(taken, only_if_warm=True)
    assert claimed.pod.pod_id not in backend.deleted
    found = await pool.view.records.get(claimed.pod.pod_id)
    assert found is not None and found.record.state == PodState.ASSIGNED
    other = next(p for p in counted if p.pod_id != claimed.pod.pod_id)
    await pool._end(other, only_if_warm=True)  # still warm: ended
    assert other.pod_id in backend.deleted


async def test_a_burst_of_acquires_claims_its_pods_in_one_transaction(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool, _, _ = await make_pool(warm_target=6)
    await warm_count(pool, 6)
    flushes = pool.claim_flushes
    got = await asyncio.gather(*(pool.acquire(ask(f"t{i}")) for i in range(6)))
    assert len({a.pod.pod_id for a in got}) == 6
    assert not any(a.cold_start for a in got)
    assert pool.claim_flushes == flushes + 1  # one read and one etcd transaction for all six
    for acquired in got:
        found = await pool.view.records.get(acquired.pod.pod_id)
        assert found is not None and found.record.task_id == acquired.pod.task_id


async def test_two_pools_claiming_at_once_never_share_a_pod(make_pool) -> None:  # type: ignore[no-untyped-def]
    # Two podpool replicas over one etcd: a batch whose pod the other took falls back to
    # claiming one by one, and no pod goes to two tasks.
    first, _, _ = await make_pool(warm_target=4)
    await warm_count(first, 4)
    second, _, _ = await make_pool(warm_target=0, start=False)
    await second.view.wait_for(lambda pods: len(pods) >= 4, timeout_s=10)
    got = await asyncio.gather(
        *(first.acquire(ask(f"a{i}")) for i in range(4)),
        *(second.acquire(ask(f"b{i}")) for i in range(4)),
    )
    assert len({a.pod.pod_id for a in got}) == 8
    assert sum(not a.cold_start for a in got) == 4  # each warm pod handed out exactly once


async def test_refill_waits_until_the_burst_is_loaded(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool, backend, agent = await make_pool(warm_target=2, refill_defer_s=1.5)
    await warm_count(pool, 2)
    loading = asyncio.Event()
    load = agent.load

    async def slow_load(*args: object, **kw: object):  # type: ignore[no-untyped-def]
        await loading.wait()
        return await load(*args, **kw)

    agent.load = slow_load
    burst = [asyncio.create_task(pool.acquire(ask(f"t{i}"))) for i in range(2)]
    await asyncio.sleep(0.3)
    assert len(backend.created) == 2  # the loads are in flight: no new pod takes their cores
    loading.set()
    await asyncio.gather(*burst)
    await warm_count(pool, 2, timeout_s=20)  # then the pool refills
    assert len(backend.created) == 4


async def test_an_empty_host_gets_a_warm_pod_back(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool, backend, _ = await make_pool(warm_target=2, start=False)
    for name in ("pod-1", "pod-2"):
        await backend.create_pod(name)
    await warm_count(pool, 2)
    await pool.refill_once()
    assert backend.created == ["pod-1", "pod-2"]  # spread evenly: nothing to do
    backend.uneven = True  # a host came back with no warm pod while the other holds both
    await pool.refill_once()
    assert len(backend.created) == 3  # one more, for the backend to place on the empty host
    await warm_count(pool, 3)
    backend.uneven = False
    await pool.refill_once()  # the surplus pass gives one up
    await warm_count(pool, 2)
    assert len(backend.deleted) == 1
    backend.uneven = True
    await pool.refill_once()  # at most one re-spread per interval: no loop on a bad host
    assert len(backend.created) == 3
