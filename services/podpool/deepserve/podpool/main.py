"""Entry point of the podpool process: `python -m deepserve.podpool` / `deepserve podpool`."""

from __future__ import annotations

import asyncio

from deepserve import records
from deepserve.background import stop_task
from deepserve.errors import InvalidArgument
from deepserve.metrics import registry
from deepserve.podpool.backend import PodBackend
from deepserve.podpool.dram_cache import DramPreloader, make_preloader
from deepserve.podpool.host_client import GrpcHostClient
from deepserve.podpool.host_pods import make_local_backend
from deepserve.podpool.hosts_backend import AGENT_SERVICE, HostsBackend
from deepserve.podpool.kube_pod_labels import PodModelLabeler
from deepserve.podpool.kubernetes_backend import KubernetesBackend
from deepserve.podpool.node_placement import NodePlacement
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
    if settings.backend == "kubernetes":
        return KubernetesBackend(settings)
    raise InvalidArgument(
        f"unknown pod backend {settings.backend!r} ('local', 'hosts' or 'kubernetes')",
        field="backend",
    )


async def drop_registration(view: PodView, pod_id: str) -> None:
    """An engine Pod ended: its records go now, not when its lease expires."""
    found = await view.records.get(pod_id)
    if found is not None and found.lease_id:
        await view.records.store.revoke_lease(found.lease_id)


def make_dram(settings: PodPoolSettings) -> DramPreloader | None:
    # On Kubernetes the copies live on the engine nodes, kept by the node agents.
    if settings.weights_cache_dir is None or settings.backend == "kubernetes":
        return None
    return make_preloader(
        settings.weights_cache_dir,
        settings.dram_models,
        recent=settings.dram_recent_models,
        budget_mb=settings.dram_budget_mb,
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
        # The host agents (service `podhost`), watched only by the `hosts` backend.
        agents = Informer(records.services(rt.etcd, AGENT_SERVICE))
        backend = make_backend(settings, agents, view)
        placement, labeler = None, None
        if isinstance(backend, KubernetesBackend):
            backend.on_pod_ended = lambda pod_id: drop_registration(view, pod_id)
            await view.ready.wait()
            await backend.start(lambda pod_id: view.get(pod_id) is not None)
            placement = NodePlacement(rt.etcd, backend)
            placement.start()
            # Pod labels follow what each pod serves (for label-selecting routers).
            labeler = PodModelLabeler(backend.started_here, backend.patch_labels)
            view.add_handler(labeler.on_change)
            for pod in view.list():
                labeler.on_change("put", pod.pod_id, pod)
        planner = WeightsPlanner(
            lambda: instances.items,
            dram=dram,
            fork=settings.fork,
            host=settings.common.host_name,
            node_copy=placement.weights_plan if placement is not None else None,
        )

        async def stop_scaling() -> None:
            await stop_task(dram_loop)
            if dram is not None:
                await dram.close()
            await instances.stop()
            if settings.backend == "hosts":
                await agents.stop()
            if placement is not None:
                await placement.stop()
            if labeler is not None:
                await labeler.close()

        pool = WarmPodPool(
            view,
            backend,
            GrpcPodAgent(),
            warm_target=settings.warm_pods,
            max_pods=settings.max_pods,
            start_timeout_s=settings.pod_start_timeout_s,
            planner=planner,
            max_concurrent_loads=settings.max_concurrent_loads,
            refill_defer_s=settings.refill_defer_s,
            placement=placement,
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
