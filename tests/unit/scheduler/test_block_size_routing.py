"""The block size travels from a pod's instance registration (etcd) through the scheduler's
instance table to routing: a RouteRequest's prefix hashes credit only instances that cache
blocks of the size they were computed with. Real etcd (the session fixture), no Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from deepserve.flowserve.pod.registration import PodRegistration
from deepserve.jobs.records import RoutingPolicy
from deepserve.prefix_hash import prompt_block_hashes
from deepserve.records import InstanceRecord, Role
from deepserve.scheduler.decode_predictor import DecodeLengthPredictor
from deepserve.scheduler.heatmap_table import HeatmapTable
from deepserve.scheduler.instance_table import InstanceTable
from deepserve.scheduler.load_tracker import LoadTracker
from deepserve.scheduler.policy_table import PolicyTable
from deepserve.scheduler.prefix_index import PrefixIndex
from deepserve.scheduler.router import Router
from deepserve.scheduler.servicer import SchedulerServicer
from deepserve.store.etcd import EtcdStore
from deepserve.v1 import scheduler_pb2

pytestmark = pytest.mark.timeout(60)

PROMPT = list(range(3, 3 + 64))


@pytest.fixture
async def etcd(etcd_endpoint: str) -> AsyncIterator[EtcdStore]:
    async with EtcdStore(etcd_endpoint) as store:
        yield store


async def register(etcd: EtcdStore, model: str, block_size: int) -> PodRegistration:
    """A pod that registered its instance the way the pod shell does."""
    pod = PodRegistration(etcd, "", "127.0.0.1:1", ttl_s=10, device="cpu")
    await pod.register()
    await pod.register_instance(
        InstanceRecord(
            instance_id=f"inst-{block_size}-{uuid.uuid4().hex[:6]}",
            model=model,
            role=Role.COLOCATED,
            address=pod.pod.address,
            pod_id=pod.pod.pod_id,
            block_size=block_size,
        )
    )
    return pod


async def test_routing_credits_only_instances_of_the_hashed_block_size(etcd: EtcdStore) -> None:
    model = f"bs-{uuid.uuid4().hex[:6]}"
    pods = [await register(etcd, model, size) for size in (8, 16)]
    try:
        table = InstanceTable(etcd)
        table.start()
        try:
            deadline = asyncio.get_running_loop().time() + 30
            while len(table.of_model(model)) < 2:  # the watch delivers both registrations
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.02)
            eight, sixteen = (p.instance for p in pods)
            assert eight is not None and sixteen is not None
            assert table.get(eight.instance_id).block_size == 8  # type: ignore[union-attr]
            index = PrefixIndex()
            # Each instance holds the whole prompt, cached in blocks of its own size.
            index.store(eight.instance_id, prompt_block_hashes(PROMPT, 8))
            index.store(sixteen.instance_id, prompt_block_hashes(PROMPT, 16))
            router = Router(
                table,
                LoadTracker(None, lambda: []),
                index,
                DecodeLengthPredictor(),
                HeatmapTable(None),
                PolicyTable(None, RoutingPolicy.DEEPSERVE),
            )
            servicer = SchedulerServicer(router, table)
            listed = await servicer.ListInstances(
                scheduler_pb2.ListInstancesRequest(model=model),
                None,  # type: ignore[arg-type]
            )
            assert {i.instance_id: i.block_size for i in listed.instances} == {
                eight.instance_id: 8,
                sixteen.instance_id: 16,
            }
            for size, holder, other in ((8, eight, sixteen), (16, sixteen, eight)):
                reply = await servicer.Route(
                    scheduler_pb2.RouteRequest(
                        request_id=f"r{size}",
                        model=model,
                        prompt_tokens=len(PROMPT),
                        prefix_block_hashes=prompt_block_hashes(PROMPT, size),
                        block_size=size,
                    ),
                    None,  # type: ignore[arg-type]
                )
                assert reply.branch == scheduler_pb2.ROUTE_BRANCH_LOCALITY
                assert [i.instance_id for i in reply.instances] == [holder.instance_id]
                assert reply.instances[0].block_size == size
                assert reply.scores[holder.instance_id] == len(PROMPT) // size
                assert reply.scores[other.instance_id] == 0.0
        finally:
            await table.stop()
    finally:
        for pod in pods:
            await pod.close()
