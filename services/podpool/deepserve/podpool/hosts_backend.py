"""The `hosts` pod backend: pods spread over the hosts whose agents registered in etcd.

Each host that runs pods runs a host agent (`deepserve.podpool.host_agent`, service `podhost`).
The backend learns the agents by watch, places each new pod on the host with the fewest warm
(or starting) pods, then the fewest pods this pool placed there, then by agent id, so the warm
supply is spread (consecutive claims land on different hosts, a host's loss leaves warm pods
elsewhere) and a burst alternates between hosts; and it asks that agent to start or end pods. The pod registers itself in etcd as any pod does; the pool needs nothing
else from the host. Each agent is asked every `poll_s` which pods it still runs, only to notice
a pod that died before it registered; a registered pod's death shows in etcd (the agent
deregisters it on exit; its lease is the fallback). A host that leaves etcd (it died, or its
link was cut past the lease TTL) takes its placed pods with it: they count as ended here, and
they end themselves once they see their own leases lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from deepserve.background import stop_task
from deepserve.errors import DeepServeError, Unavailable
from deepserve.records import PodRecord, PodState, ServiceRecord

log = logging.getLogger(__name__)

AGENT_SERVICE = "podhost"


class HostClient(Protocol):
    """The calls the backend makes to an agent (`host_client.GrpcHostClient` over gRPC)."""

    async def create_pod(self, address: str, pod_id: str) -> str: ...

    async def delete_pod(self, address: str, pod_id: str, pid: int) -> None: ...

    async def list_pods(self, address: str) -> tuple[str, list[str]]: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Placement:
    agent: str  # the agent's process id (its registration's name)
    address: str
    host: str
    since: float


class HostsBackend:
    """Starts pods through the registered host agents."""

    name = "hosts"

    def __init__(
        self,
        agents: Mapping[str, ServiceRecord],
        client: HostClient,
        pods: Callable[[], Iterable[PodRecord]] = list,
        poll_s: float = 1.0,
    ) -> None:
        # Live agents by process id (an Informer's items: current without polling).
        self._agents = agents
        # The registered pods (podpool's view).
        self._pods = pods
        self._client = client
        self._poll_s = poll_s
        self._placed: dict[str, Placement] = {}
        self._ended: set[str] = set()
        self._host_of: dict[str, str] = {}  # agent process id -> its host's name
        self._poller: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._poller = asyncio.create_task(self._poll_loop(), name="hosts-backend-poll")

    def check_model(self, model: str) -> None:
        # Every host holds the same model files (a shared volume, or the same pulls): a catalog
        # name must be pulled, a path must hold a model, as for local pods.
        from deepserve.models.catalog import default_cache_dir, resolve_model

        resolve_model(model, default_cache_dir())

    def placements(self) -> Counter[str]:
        """Pods placed per agent (those not seen ending)."""
        return Counter(p.agent for p in self._placed.values())

    def _warm_by_agent(self) -> Counter[str]:
        """Warm pods per agent, a starting pod counted as warm (it soon is)."""
        registered = {p.pod_id: p for p in self._pods()}
        warm: Counter[str] = Counter()
        agent_of_host = {host: agent for agent, host in self._host_of.items()}
        for pod in registered.values():
            if pod.state == PodState.WARM and pod.host in agent_of_host:
                warm[agent_of_host[pod.host]] += 1
        for pod_id, where in self._placed.items():
            if pod_id not in registered:  # starting: warm soon
                warm[where.agent] += 1
        return warm

    def _order(self) -> list[tuple[str, ServiceRecord]]:
        """Agents, best host for a new warm pod first."""
        placed = self.placements()
        warm = self._warm_by_agent()
        return sorted(self._agents.items(), key=lambda kv: (warm[kv[0]], placed[kv[0]], kv[0]))

    def warm_unevenly_spread(self) -> bool:
        warm = self._warm_by_agent()
        counts = [warm[agent] for agent in self._agents]
        return len(counts) > 1 and min(counts) == 0 and max(counts) >= 2

    async def create_pod(self, pod_id: str) -> None:
        agents = self._order()
        if not agents:
            raise Unavailable("no host agent is registered (service 'podhost')")
        errors: list[str] = []
        for agent, record in agents:
            # Counted before the call, so concurrent creates see it and spread.
            self._placed[pod_id] = Placement(
                agent, record.address, self._host_of.get(agent, ""), time.monotonic()
            )
            try:
                host = await self._client.create_pod(record.address, pod_id)
            except DeepServeError as exc:  # that host is unreachable: try the next one
                del self._placed[pod_id]
                errors.append(f"{agent}: {exc}")
                continue
            except BaseException:
                del self._placed[pod_id]
                raise
            self._host_of[agent] = host
            self._placed[pod_id] = Placement(agent, record.address, host, time.monotonic())
            log.info(
                "pod placed", extra={"fields": {"pod_id": pod_id, "host": host, "agent": agent}}
            )
            return
        raise Unavailable(f"no host agent could start pod {pod_id}: {'; '.join(errors)}")

    def is_starting(self, pod_id: str) -> bool:
        placed = self._placed.get(pod_id)
        return placed is not None and placed.agent in self._agents and pod_id not in self._ended

    def started_here(self, pod_id: str) -> bool:
        return pod_id in self._placed

    def _agent_for(self, pod: PodRecord) -> tuple[str, str] | None:
        placed = self._placed.get(pod.pod_id)
        if placed is not None:
            return placed.agent, placed.address
        for agent, record in sorted(self._agents.items()):
            if pod.host and self._host_of.get(agent) == pod.host:
                return agent, record.address
        return None

    async def delete_pod(self, pod: PodRecord) -> None:
        found = self._agent_for(pod)
        self._placed.pop(pod.pod_id, None)
        self._ended.discard(pod.pod_id)
        if found is None or found[0] not in self._agents:
            # Its host is gone or unknown: the pod ends itself once its lease is lost.
            log.info("pod's host agent not registered", extra={"fields": {"pod_id": pod.pod_id}})
            return
        try:
            await self._client.delete_pod(found[1], pod.pod_id, pod.pid)
        except DeepServeError as exc:
            log.warning("ending pod %s on %s failed: %s", pod.pod_id, found[0], exc)

    def reap(self) -> list[str]:
        gone = [pod_id for pod_id in self._placed if not self.is_starting(pod_id)]
        for pod_id in gone:
            del self._placed[pod_id]
            self._ended.discard(pod_id)
        return gone

    async def poll_once(self) -> None:
        """Asks every agent which of its pods still run; marks placed pods it no longer runs."""
        for agent, record in list(self._agents.items()):
            asked_at = time.monotonic()
            try:
                host, alive = await self._client.list_pods(record.address)
            except DeepServeError as exc:
                log.debug("listing pods of %s failed: %s", agent, exc)
                continue
            self._host_of[agent] = host
            running = set(alive)
            for pod_id, placed in list(self._placed.items()):
                # Only pods placed before the question was asked can be missing from its answer.
                if placed.agent == agent and placed.since < asked_at and pod_id not in running:
                    self._ended.add(pod_id)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("polling host agents failed")

    async def close(self) -> None:
        await stop_task(self._poller)
        placed, self._placed = dict(self._placed), {}
        for pod_id, where in placed.items():
            if where.agent in self._agents:
                with contextlib.suppress(DeepServeError):
                    await self._client.delete_pod(where.address, pod_id, 0)
        await self._client.close()
