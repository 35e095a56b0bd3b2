"""The node agent: DRAM pre-loading on one Kubernetes node (`python -m deepserve.podpool.node_agent`).

On Kubernetes, podpool runs on one node and engine Pods on many, so the weights copies a new
instance maps must live on the Pod's node. One agent per node (a DaemonSet) keeps them in the
node's weights cache (a hostPath the engine Pods mount at the same path): the pinned models plus
the models scaled up most recently anywhere (seen as new instances in etcd). It publishes what
the node holds as a NodeWeightsRecord on its own lease, so podpool can place a task on a node
holding its model's weights (node_placement), and a dead agent's copies stop counting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from pathlib import Path

from pydantic_settings import SettingsConfigDict

from deepserve import records
from deepserve.config import ServiceSettings
from deepserve.podpool.dram_cache import DramPreloader, make_preloader
from deepserve.records import InstanceRecord, NodeWeightsCopy, NodeWeightsRecord
from deepserve.store.etcd import EtcdStore, KeepAliveLease
from deepserve.store.informer import Informer
from deepserve.telemetry import setup_telemetry, shutdown_telemetry

log = logging.getLogger(__name__)


class NodeAgentSettings(ServiceSettings):
    """The node agent, read from `DEEPSERVE_NODE_AGENT_*` variables."""

    model_config = SettingsConfigDict(env_prefix="DEEPSERVE_NODE_AGENT_", extra="ignore")

    # This node's name (the downward API's spec.nodeName); empty: the host name.
    node_name: str = ""
    # Models always kept (comma-separated names or paths), plus this many recently scaled up.
    models: str = ""
    recent_models: int = 2
    budget_mb: int = 0
    weights_cache_dir: Path = Path("/dev/shm/deepserve-weights")
    device: str = ""
    # The engine Pods' weights dtype (bfloat16 for GPU and NPU Pods: the agent has no
    # accelerator to tell); empty: this agent's device's default.
    dtype: str = ""
    # Seconds between passes (prepare, evict, publish).
    interval_s: float = 5.0


class NodeAgent:
    """Keeps this node's copies and publishes them at /deepserve/nodeweights/<node>."""

    def __init__(
        self, etcd: EtcdStore, node: str, dram: DramPreloader, *, lease_ttl_s: int = 10
    ) -> None:
        self.etcd = etcd
        self.node = node
        self.dram = dram
        self.lease_ttl_s = lease_ttl_s
        self._records = records.node_weights(etcd)
        self._lease: KeepAliveLease | None = None
        self._published: list[NodeWeightsCopy] | None = None
        self._instances = Informer(records.instances(etcd))
        self._instances.add_handler(self._on_instance)

    def copies(self) -> list[NodeWeightsCopy]:
        return sorted(
            (
                NodeWeightsCopy(
                    model=e.model, tensor_parallel_size=e.tp_size, nbytes=e.nbytes, path=str(e.path)
                )
                for e in self.dram.layout.entries()
            ),
            key=lambda c: (c.model, c.tensor_parallel_size),
        )

    async def publish(self) -> bool:
        """Writes the node's record when what it holds changed; True when it wrote."""
        copies = self.copies()
        if self._lease is None or self._lease.lost.is_set():
            # First pass, or etcd lost the lease (and the record with it): publish anew.
            self._lease = await self.etcd.grant_lease(self.lease_ttl_s)
            self._published = None
        if copies == self._published:
            return False
        record = NodeWeightsRecord(node=self.node, copies=copies)
        await self._records.put(self.node, record, lease_id=self._lease.id)
        self._published = copies
        log.info(
            "node weights published",
            extra={"fields": {"node": self.node, "models": [c.model for c in copies]}},
        )
        return True

    async def run_once(self) -> None:
        await self.dram.reconcile()
        # Wait for copies being made this pass, so they are published as soon as they exist.
        busy = [t for t in (self.dram.preparing(m) for m in self.dram.pinned) if t is not None]
        if busy:
            await asyncio.gather(*busy, return_exceptions=True)
        await self.publish()

    async def run(self, interval_s: float) -> None:
        self._instances.start()
        try:
            while True:
                try:
                    await self.run_once()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("node agent pass failed")
                await asyncio.sleep(interval_s)
        finally:
            await self._instances.stop()

    async def close(self) -> None:
        await self.dram.close()
        if self._lease is not None:
            with contextlib.suppress(Exception):
                await self._lease.revoke()

    def _on_instance(self, kind: str, _instance_id: str, instance: InstanceRecord | None) -> None:
        # A new instance anywhere is a scale-up of its model: keep (or make) its copy here.
        if kind == "put" and instance is not None:
            self.dram.note_demand(instance.model, instance.tensor_parallel_size)


async def serve(settings: NodeAgentSettings) -> None:
    setup_telemetry("node-agent", settings.common)
    node = settings.node_name or socket.gethostname()
    dram = make_preloader(
        settings.weights_cache_dir,
        settings.models,
        recent=settings.recent_models,
        budget_mb=settings.budget_mb,
        device=settings.device,
        dtype=settings.dtype,
    )
    async with EtcdStore(settings.common.etcd_endpoint) as etcd:
        agent = NodeAgent(etcd, node, dram, lease_ttl_s=max(settings.common.lease_ttl_s, 5))
        try:
            await agent.run(settings.interval_s)
        finally:
            await agent.close()
            shutdown_telemetry()


def main() -> None:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(NodeAgentSettings()))


if __name__ == "__main__":
    main()
