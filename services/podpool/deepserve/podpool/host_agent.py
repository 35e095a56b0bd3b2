"""A host agent: `python -m deepserve.podpool.host_agent`, one on every host that runs pods.

It registers as service `podhost` (its address in etcd, on a lease, put back under the same id
after a cut link), starts and ends this host's pods for podpool's `hosts` backend, and
deregisters this host's pods whose processes exit. Its pods register in etcd themselves, exactly
as local ones do, with this host's name (`DEEPSERVE_HOST_NAME`) and address (`DEEPSERVE_HOST`).
"""

from __future__ import annotations

import asyncio

from deepserve.podpool.host_agent_servicer import PodHostServicer
from deepserve.podpool.host_pods import HostPods, make_local_backend
from deepserve.podpool.pod_exits import PodExitWatcher
from deepserve.podpool.pod_view import PodView
from deepserve.podpool.settings import HostAgentSettings
from deepserve.runtime import ServiceRuntime
from deepserve.v1 import podhost_pb2, podhost_pb2_grpc

SERVICE = "podhost"
SERVICE_NAME = podhost_pb2.DESCRIPTOR.services_by_name["PodHostService"].full_name


async def serve(settings: HostAgentSettings) -> None:
    async with ServiceRuntime(SERVICE, settings) as rt:
        backend = make_local_backend(settings.pods)
        pods = HostPods(backend, settings.common.host_name)
        await pods.prepare()
        view = PodView(rt.etcd)
        exits = PodExitWatcher(view, rt.etcd, settings.common.host_name, backend=backend.name)
        exits.start()
        view.start()
        servicer = PodHostServicer(pods)
        await rt.serve(
            [
                lambda server: podhost_pb2_grpc.add_PodHostServiceServicer_to_server(
                    servicer, server
                )
            ],
            [SERVICE_NAME],
            # The watcher stops first: pods the agent ends on purpose deregister themselves.
            on_shutdown=[exits.stop, pods.close, view.stop],
        )


def main() -> None:
    asyncio.run(serve(HostAgentSettings()))


if __name__ == "__main__":
    main()
