"""In-process PD pairs for tests: engines behind real gRPC servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from deepserve.flowserve.disagg.endpoint import DisaggEndpoint
from deepserve.flowserve.engine.async_engine import AsyncEngine
from deepserve.flowserve.pod.servicer import FlowServeServicer
from deepserve.flowserve.transfer.settings import TransferSettings
from deepserve.records import Role
from deepserve.rpc.errors import DomainErrorInterceptor
from deepserve.v1 import common_pb2, flowserve_pb2, flowserve_pb2_grpc

MODEL = "m"


class StubShell:
    """What FlowServeServicer needs of a TaskExecutorShell, over a ready engine."""

    def __init__(self, engine: AsyncEngine, settings: TransferSettings, role: Role) -> None:
        self.engine = engine
        self.disagg = DisaggEndpoint(engine, settings)
        self.tokenizer = None
        self.model_name = MODEL
        self.instance_id = f"inst-{role.value}"
        self.role = role
        self.ready = True

    def require_engine(self, model: str) -> AsyncEngine:
        return self.engine

    def require_disagg(self, model: str) -> DisaggEndpoint:
        return self.disagg


@dataclass
class Served:
    """An engine behind a gRPC server."""

    engine: AsyncEngine
    shell: StubShell
    server: grpc.aio.Server
    address: str
    servicer: FlowServeServicer
    extra: dict[str, Any] = field(default_factory=dict)

    async def stop(self) -> None:
        await self.shell.disagg.close()
        await self.server.stop(0)


async def serve(
    engine: AsyncEngine,
    settings: TransferSettings,
    role: Role = Role.COLOCATED,
    servicer_cls: Callable[[StubShell], FlowServeServicer] = FlowServeServicer,
) -> Served:
    shell = StubShell(engine, settings, role)
    servicer = servicer_cls(shell)
    server = grpc.aio.server(interceptors=[DomainErrorInterceptor()])
    flowserve_pb2_grpc.add_FlowServeServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return Served(engine, shell, server, f"127.0.0.1:{port}", servicer)


def settings(tmp_path: Path, **overrides: Any) -> TransferSettings:
    values: dict[str, Any] = {
        "shared_memory_dir": tmp_path,
        "idle_timeout_s": 5.0,
        "prefill_timeout_s": 30.0,
        "reserve_timeout_s": 10.0,
    }
    values.update(overrides)
    return TransferSettings(**values)


def generate_request(
    request_id: str,
    prompt: list[int],
    max_tokens: int,
    prefill_address: str = "",
    mode: int = flowserve_pb2.KV_TRANSFER_MODE_UNSPECIFIED,
) -> flowserve_pb2.GenerateRequest:
    return flowserve_pb2.GenerateRequest(
        request_id=request_id,
        model=MODEL,
        prompt_token_ids=prompt,
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens),
        prefill_address=prefill_address,
        kv_transfer_mode=mode,  # type: ignore[arg-type]
    )


async def generate_tokens(
    stub: flowserve_pb2_grpc.FlowServeServiceStub, request: flowserve_pb2.GenerateRequest
) -> tuple[list[int], flowserve_pb2.GenerateResponse]:
    tokens: list[int] = []
    last = flowserve_pb2.GenerateResponse()
    async for reply in stub.Generate(request, timeout=60):
        tokens.extend(reply.token_ids)
        last = reply
    return tokens, last


async def kv_state(engine: AsyncEngine) -> dict[str, int]:
    """Block accounting read on the engine thread (after every queued command ran)."""

    def read(core: Any) -> dict[str, int]:
        stats = core.kv_cache.stats()
        return {
            "used": stats.num_used_blocks,
            "running": core.planner.num_running + core.planner.num_waiting,
            "remote": core.planner.num_waiting_for_remote_kv,
            "held": core.planner.num_holding_kv,
        }

    return await asyncio.wrap_future(engine.call_in_engine(read))


async def wait_idle(engine: AsyncEngine, timeout_s: float = 10.0) -> dict[str, int]:
    """Waits until the engine holds no request and no block; returns the last reading."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        state = await kv_state(engine)
        if not any(state.values()) or asyncio.get_running_loop().time() > deadline:
            return state
        await asyncio.sleep(0.02)


async def aclosing_iter(it: AsyncIterator[Any]) -> list[Any]:
    return [x async for x in it]
