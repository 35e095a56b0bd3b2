"""The `hosts` backend's placement and bookkeeping, with agents standing in as an in-memory
HostClient (the wire is covered by test_host_agent.py and tests/multihost)."""

from __future__ import annotations

import pytest

from deepserve.errors import Unavailable
from deepserve.podpool.hosts_backend import HostsBackend
from deepserve.records import PodRecord, PodState, ServiceRecord


class Agents:
    """Host agents by address: which pods each runs; `down` ones refuse every call."""

    def __init__(self, hosts: dict[str, str]) -> None:
        self.host_of = hosts  # address -> host name
        self.running: dict[str, set[str]] = {a: set() for a in hosts}
        self.down: set[str] = set()
        self.deleted: list[tuple[str, str, int]] = []

    def _check(self, address: str) -> None:
        if address in self.down:
            raise Unavailable(f"{address} unreachable")

    async def create_pod(self, address: str, pod_id: str) -> str:
        self._check(address)
        self.running[address].add(pod_id)
        return self.host_of[address]

    async def delete_pod(self, address: str, pod_id: str, pid: int) -> None:
        self._check(address)
        self.running[address].discard(pod_id)
        self.deleted.append((address, pod_id, pid))

    async def list_pods(self, address: str) -> tuple[str, list[str]]:
        self._check(address)
        return self.host_of[address], sorted(self.running[address])

    async def close(self) -> None:
        pass


def registry(agents: Agents) -> dict[str, ServiceRecord]:
    return {
        f"podhost-{host}": ServiceRecord(
            service="podhost", process_id=f"podhost-{host}", address=addr, pid=1, host=addr
        )
        for addr, host in agents.host_of.items()
    }


def warm(pod_id: str, host: str) -> PodRecord:
    return PodRecord(pod_id=pod_id, state=PodState.WARM, address="x:1", host=host, pid=7)


@pytest.fixture
def agents() -> Agents:
    return Agents({"10.0.0.1:50054": "h1", "10.0.0.2:50054": "h2"})


async def test_a_burst_alternates_between_hosts(agents: Agents) -> None:
    backend = HostsBackend(registry(agents), agents)
    for i in range(6):
        await backend.create_pod(f"p{i}")
    assert sorted(len(p) for p in agents.running.values()) == [3, 3]
    assert all(backend.is_starting(f"p{i}") for i in range(6))


async def test_a_new_pod_goes_where_fewest_pods_are_warm(agents: Agents) -> None:
    pods: list[PodRecord] = []
    backend = HostsBackend(registry(agents), agents, pods=lambda: pods)
    await backend.create_pod("a")  # h1 (ties by agent id)
    await backend.create_pod("b")  # h2
    # Both registered; h1's pod was then claimed (assigned), h2's is still warm.
    pods[:] = [
        PodRecord(pod_id="a", state=PodState.ASSIGNED, address="x:1", host="h1", pid=1),
        warm("b", "h2"),
    ]
    await backend.create_pod("c")
    assert "c" in agents.running["10.0.0.1:50054"]


async def test_an_unreachable_host_is_skipped_and_none_left_is_unavailable(
    agents: Agents,
) -> None:
    backend = HostsBackend(registry(agents), agents)
    agents.down.add("10.0.0.1:50054")
    await backend.create_pod("p")
    assert agents.running["10.0.0.2:50054"] == {"p"}
    agents.down.add("10.0.0.2:50054")
    with pytest.raises(Unavailable, match="no host agent could start"):
        await backend.create_pod("q")
    assert not backend.started_here("q")
    with pytest.raises(Unavailable, match="no host agent is registered"):
        await HostsBackend({}, agents).create_pod("r")


async def test_pods_that_died_before_registering_are_reaped(agents: Agents) -> None:
    backend = HostsBackend(registry(agents), agents)
    await backend.create_pod("p")
    await backend.create_pod("q")
    for running in agents.running.values():
        running.discard("p")  # its process exited on the host
    await backend.poll_once()
    assert backend.reap() == ["p"]
    assert backend.is_starting("q") and not backend.started_here("p")


async def test_a_host_that_leaves_takes_its_pods(agents: Agents) -> None:
    agent_records = registry(agents)
    backend = HostsBackend(agent_records, agents)
    await backend.create_pod("p")  # h1
    await backend.create_pod("q")  # h2
    del agent_records["podhost-h1"]  # its registration expired (host dead or cut off)
    assert backend.reap() == ["p"]
    # Ending a pod of a gone host asks nobody (it ends itself on losing its lease).
    await backend.delete_pod(warm("p", "h1"))
    assert agents.deleted == []


async def test_delete_reaches_the_pods_host_even_after_a_pool_restart(agents: Agents) -> None:
    backend = HostsBackend(registry(agents), agents)
    await backend.poll_once()  # learns each agent's host name
    # A pod the previous podpool placed: known only by its record.
    await backend.delete_pod(warm("old", "h2"))
    assert agents.deleted == [("10.0.0.2:50054", "old", 7)]


async def test_close_ends_the_pods_it_placed(agents: Agents) -> None:
    backend = HostsBackend(registry(agents), agents)
    await backend.create_pod("p")
    await backend.create_pod("q")
    await backend.close()
    assert all(not pods for pods in agents.running.values())


def test_surplus_warm_pods_end_where_they_crowd() -> None:
    from deepserve.podpool.warm_pool import _crowded_first

    pods = [warm(f"a{i}", "h1") for i in range(3)] + [warm("b0", "h2")]
    ended = _crowded_first(pods, pods, 2)
    # Both from h1 (3 warm there, 1 on h2), newest first; h2 keeps its only one.
    assert [p.pod_id for p in ended] == ["a2", "a1"]
    assert [p.pod_id for p in _crowded_first(pods, pods, 3)] == ["a2", "a1", "b0"]


async def test_a_host_without_warm_pods_beside_a_crowded_one_is_uneven(agents: Agents) -> None:
    pods: list[PodRecord] = []
    backend = HostsBackend(registry(agents), agents, pods=lambda: pods)
    assert not backend.warm_unevenly_spread()  # nothing anywhere
    await backend.create_pod("a")
    await backend.create_pod("b")
    pods[:] = [warm("a", "h1"), warm("b", "h2")]
    assert not backend.warm_unevenly_spread()
    # h2's pod ended (its host was cut off) and h1 refilled: two warm on h1, none on h2.
    await backend.delete_pod(pods[1])
    agents.down.add("10.0.0.2:50054")
    await backend.create_pod("c")
    agents.down.clear()
    pods[:] = [warm("a", "h1"), warm("c", "h1")]
    assert backend.warm_unevenly_spread()
    await backend.create_pod("d")  # placed on h2, starting: counted as warm soon
    assert "d" in agents.running["10.0.0.2:50054"]
    assert not backend.warm_unevenly_spread()
