"""Entry point of the podpool process: `python -m deepserve.podpool` / `deepserve podpool`."""

from __future__ import annotations

import asyncio
import contextlib

from deepserve import records
from deepserve.errors import InvalidArgument
from deepserve.metrics import registry
from deepserve.podpool.backend import PodBackend
from deepserve.podpool.dram_cache import DramPreloader, ModelResolver
from deepserve.podpool.host_client import GrpcHostClient
from deepserve.podpool.host_pods import make_local_backend
from deepserve.podpool.hosts_backend import AGENT_SERVICE, HostsBackend
from deepserve.podpool.pod_agent import GrpcPodAgent
from deepserve.podpool.pod_exits import PodExitWatcher
from deepserve.podpool.pod_view import PodView
from deepserve.podpool.pool_metrics import PoolCollector
from deepserve.podpool.servicer import PodPoolServicer
from deepserve.podpool.settings import PodPoolSettings
from deepserve.podpool.warm_pool import WarmPodPool
from deepserve.podpool.weights_planner import WeightsPlanner
from deepserve.records import ServiceRecord
from deepserve.runtime import ServiceRuntime
from deepserve.scaling.weights_cache import WeightsCacheLayout
from deepserve.store.informer import Informer
from deepserve.v1 import podpool_pb2, podpool_pb2_grpc

SERVICE_NAME = podpool_pb2.DESCRIPTOR.services_by_name["PodPoolService"].full_name


def make_backend(
    settings: PodPoolSettings, agents: Informer[ServiceRecord], view: PodView
) -> PodBackend:
    if settings.backend == "hosts":
        agents.start()
        hosts = HostsBackend(agents.items, GrpcHostClient(), view.list)
        hosts.start()
        return hosts
    if settings.backend == "local":
        return make_local_backend(settings)
    raise InvalidArgument(
        f"unknown pod backend {settings.backend!r} ('local' or 'hosts')", field="backend"
    )


def make_dram(settings: PodPoolSettings) -> DramPreloader | None:
    if settings.weights_cache_dir is None:
        return None
    return DramPreloader(
        WeightsCacheLayout(settings.weights_cache_dir),
        ModelResolver(),
        pinned=[m.strip() for m in settings.dram_models.split(",") if m.strip()],
        recent=settings.dram_recent_models,
        budget_bytes=settings.dram_budget_mb * 1024 * 1024,
        device=settings.pod_device,
    )


async def serve(settings: PodPoolSettings) -> None:
    async with ServiceRuntime("podpool", settings) as rt:
        view = PodView(rt.etcd)
        # Before the view starts, so it sees every pod of the first listing.
        exits = PodExitWatcher(view, rt.etcd, settings.common.host_name, backend=settings.backend)
        exits.start()
        view.start()
        registry().register(PoolCollector(view))
        # Running instances: the fork sources for new ones.
        instances = Informer(records.instances(rt.etcd))
        instances.start()
        dram = make_dram(settings)
        dram_loop = asyncio.create_task(dram.run()) if dram is not None else None
        planner = WeightsPlanner(
            lambda: instances.items,
            dram=dram,
            fork=settings.fork,
            host=settings.common.host_name,
        )

        async def stop_scaling() -> None:
            if dram_loop is not None:
                dram_loop.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await dram_loop
            if dram is not None:
                await dram.close()
            await instances.stop()
            await agents.stop()

        # The host agents (service `podhost`), watched only by the `hosts` backend.
        agents = Informer(records.services(rt.etcd, AGENT_SERVICE))
        pool = WarmPodPool(
            view,
            make_backend(settings, agents, view),
            GrpcPodAgent(),
            warm_target=settings.warm_pods,
            max_pods=settings.max_pods,
            start_timeout_s=settings.pod_start_timeout_s,
            planner=planner,
            max_concurrent_loads=settings.max_concurrent_loads,
            refill_defer_s=settings.refill_defer_s,
        )
        pool.start()
        servicer = PodPoolServicer(view, pool)
        await rt.serve(
            [
                lambda server: podpool_pb2_grpc.add_PodPoolServiceServicer_to_server(
                    servicer, server
                )
            ],
            [SERVICE_NAME],
            # The watcher stops first: pods podpool ends on purpose deregister themselves.
            on_shutdown=[exits.stop, pool.close, stop_scaling, view.stop],
        )


def main() -> None:
    asyncio.run(serve(PodPoolSettings()))
