"""Entry point of a FlowServe pod: `python -m deepserve.flowserve` / `deepserve flowserve`.

Without `DEEPSERVE_FLOWSERVE_MODEL` the pod starts warm (runtime imported, no model) and waits
for LoadModel; with it, the pod loads that model at start.
"""

from __future__ import annotations

import asyncio

from deepserve.flowserve.pod.engine_metrics import EngineStatsCollector
from deepserve.flowserve.pod.gaie_metrics import GaieMetricsCollector, LoraAdapters
from deepserve.flowserve.pod.openai_http import OpenAIHttpListener
from deepserve.flowserve.pod.servicer import FlowServeServicer
from deepserve.flowserve.pod.shell import TaskExecutorShell
from deepserve.flowserve.settings import FlowServeSettings
from deepserve.metrics import registry
from deepserve.records import Role
from deepserve.runtime import ServiceRuntime
from deepserve.v1 import flowserve_pb2, flowserve_pb2_grpc

SERVICE_NAME = flowserve_pb2.DESCRIPTOR.services_by_name["FlowServeService"].full_name


async def serve(settings: FlowServeSettings) -> None:
    async with ServiceRuntime("flowserve", settings, use_redis=True) as rt:
        assert rt.redis is not None
        shell = TaskExecutorShell(settings, rt.etcd, rt.redis)
        registry().register(
            EngineStatsCollector(
                lambda: (
                    (shell.engine, shell.instance_id, shell.model_name) if shell.engine else None
                )
            )
        )

        # The Gateway API Inference Extension's model-server metrics (vllm:*), for Kubernetes
        # routers (an InferencePool's endpoint picker), with the LoRA adapters in use.
        def lora_in_use() -> LoraAdapters:
            if shell.engine is None:
                return LoraAdapters(max_lora=settings.max_loras)
            running, waiting = shell.engine.adapter_requests()
            return LoraAdapters(sorted(running), sorted(waiting), settings.max_loras)

        registry().register(
            GaieMetricsCollector(
                lambda: (shell.engine, shell.model_name) if shell.engine else None,
                adapters=lora_in_use,
            )
        )
        servicer = FlowServeServicer(shell)
        await rt.start(
            [
                lambda server: flowserve_pb2_grpc.add_FlowServeServiceServicer_to_server(
                    servicer, server
                )
            ],
            [SERVICE_NAME],
        )
        await shell.start(rt.address)
        http = OpenAIHttpListener(shell)
        http_address = ""
        if settings.http_port > 0:
            port = await http.start(rt.common.host, settings.http_port)
            http_address = f"{rt.common.host}:{port}"
        if settings.model:
            await shell.load_model(
                settings.model, Role(settings.role), tp_size=settings.tensor_parallel_size
            )
        await rt.serve([], [], on_shutdown=[http.close, shell.close], http_address=http_address)


def main() -> None:
    asyncio.run(serve(FlowServeSettings()))
