"""EtcdStore against a real etcd: CAS, leases, watches, typed records, leader election."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest
from pydantic import BaseModel

from deepserve.errors import Conflict, NotFound
from deepserve.store.election import LeaderElection
from deepserve.store.etcd import CasWrite, EtcdStore, TypedPrefix
from deepserve.store.informer import Informer
from deepserve.store.keys import ROOT, Keys

pytestmark = pytest.mark.integration


class Thing(BaseModel):
    name: str
    count: int = 0


@pytest.fixture
async def store(etcd_endpoint: str):
    s = EtcdStore(etcd_endpoint)
    await s.connect()
    yield s
    await s.close()


def unique_prefix() -> str:
    return f"{ROOT}test-{uuid.uuid4().hex[:8]}/"


async def test_create_is_exclusive_and_cas_detects_concurrent_writes(store: EtcdStore) -> None:
    key = unique_prefix() + "k"
    rev = await store.create(key, b"v1")
    with pytest.raises(Conflict):
        await store.create(key, b"other")
    rev2 = await store.compare_and_swap(key, b"v2", expected_mod_revision=rev)
    assert rev2 > rev
    with pytest.raises(Conflict):  # stale revision: someone wrote in between
        await store.compare_and_swap(key, b"v3", expected_mod_revision=rev)
    kv = await store.get(key)
    assert kv is not None and kv.value == b"v2"
    with pytest.raises(Conflict):
        await store.delete(key, expected_mod_revision=rev)
    assert await store.delete(key, expected_mod_revision=rev2)
    assert await store.get(key) is None


async def test_compare_and_swap_many_writes_all_keys_or_none(store: EtcdStore) -> None:
    prefix = unique_prefix()
    revs = [await store.create(f"{prefix}{i}", b"free") for i in range(3)]
    rev = await store.compare_and_swap_many(
        [CasWrite(f"{prefix}{i}", b"claimed", revs[i]) for i in range(2)]
    )
    assert [(await store.get(f"{prefix}{i}")).value for i in range(3)] == [  # type: ignore[union-attr]
        b"claimed",
        b"claimed",
        b"free",
    ]
    assert [(await store.get(f"{prefix}{i}")).mod_revision for i in range(2)] == [rev, rev]  # type: ignore[union-attr]
    # One stale revision among them: nothing is written.
    with pytest.raises(Conflict):
        await store.compare_and_swap_many(
            [CasWrite(f"{prefix}2", b"claimed", revs[2]), CasWrite(f"{prefix}0", b"again", revs[0])]
        )
    assert (await store.get(f"{prefix}2")).value == b"free"  # type: ignore[union-attr]
    assert (await store.get(f"{prefix}0")).value == b"claimed"  # type: ignore[union-attr]


async def test_typed_update_retries_lost_races(store: EtcdStore) -> None:
    prefix = unique_prefix()
    things = TypedPrefix(store, prefix, Thing, lambda n: prefix + n)
    await things.create("a", Thing(name="a"))

    def bump(t: Thing) -> Thing:
        t.count += 1
        return t

    # 20 concurrent read-modify-writes: CAS makes every increment count exactly once.
    await asyncio.gather(*(things.update("a", bump) for _ in range(20)))
    got = await things.require("a")
    assert got.record.count == 20
    with pytest.raises(NotFound):
        await things.require("missing")


async def test_lease_keeps_key_alive_and_revoke_deletes_it(store: EtcdStore) -> None:
    key = unique_prefix() + "leased"
    lease = await store.grant_lease(2)
    await store.put(key, b"x", lease_id=lease.id)
    await asyncio.sleep(3.0)  # longer than the TTL: only keep-alive keeps it
    assert await store.get(key) is not None
    await lease.revoke()
    assert await store.get(key) is None


async def test_key_expires_when_keepalive_stops(store: EtcdStore) -> None:
    key = unique_prefix() + "orphan"
    lease = await store.grant_lease(1)
    await store.put(key, b"x", lease_id=lease.id)
    assert lease._task is not None
    lease._task.cancel()  # the owner "dies": no more refreshes
    deadline = asyncio.get_running_loop().time() + 6
    while await store.get(key) is not None:
        assert asyncio.get_running_loop().time() < deadline, "leased key outlived its TTL"
        await asyncio.sleep(0.2)


async def test_watch_sees_puts_and_deletes_in_order(store: EtcdStore) -> None:
    prefix = unique_prefix()
    _, revision = await store.list(prefix)
    seen: list[tuple[str, str]] = []

    async def consume() -> None:
        async for ev in store.watch_prefix(prefix, start_revision=revision + 1):
            seen.append((ev.kind, ev.key.removeprefix(prefix)))
            if len(seen) == 3:
                return

    task = asyncio.create_task(consume())
    await store.put(prefix + "a", b"1")
    await store.put(prefix + "b", b"2")
    await store.delete(prefix + "a")
    await asyncio.wait_for(task, 10)
    assert seen == [("put", "a"), ("put", "b"), ("delete", "a")]


async def test_informer_mirrors_prefix(store: EtcdStore) -> None:
    prefix = unique_prefix()
    things = TypedPrefix(store, prefix, Thing, lambda n: prefix + n)
    await things.put("pre", Thing(name="pre"))
    informer = Informer(things)
    events: list[tuple[str, str]] = []
    informer.add_handler(lambda kind, name, _r: events.append((kind, name)))
    informer.start()
    try:
        assert await informer.wait_for(lambda items: "pre" in items, 5)
        await things.put("new", Thing(name="new", count=3))
        assert await informer.wait_for(lambda items: "new" in items, 5)
        assert informer.items["new"].count == 3
        await things.delete("pre")
        assert await informer.wait_for(lambda items: "pre" not in items, 5)
        assert events == [("put", "pre"), ("put", "new"), ("delete", "pre")]
    finally:
        await informer.stop()


async def test_leader_election_hands_over_when_leader_dies(etcd_endpoint: str) -> None:
    name = f"test-{uuid.uuid4().hex[:8]}"
    stores = [EtcdStore(etcd_endpoint) for _ in range(2)]
    for s in stores:
        await s.connect()
    a = LeaderElection(stores[0], name, "a", ttl_s=1)
    b = LeaderElection(stores[1], name, "b", ttl_s=1)
    await a.campaign()
    b_task = asyncio.create_task(b.campaign())
    await asyncio.sleep(0.5)
    assert a.is_leader and not b_task.done()
    assert await b.leader() == "a"
    # Simulate a crash: a stops refreshing its lease without resigning.
    assert a._lease is not None and a._lease._task is not None
    a._lease._task.cancel()
    await asyncio.wait_for(b_task, 10)
    assert b.is_leader
    assert await b.leader() == "b"
    await b.resign()
    for s in stores:
        await s.close()
    with contextlib.suppress(Exception):
        await stores[0].delete_prefix(Keys.election_prefix(name))
