"""The dispatcher migrates a request whose instance dies mid-stream, over real gRPC.

Real engines (AsyncEngine on the deterministic fake executor, slowed so a test can stop an
instance between tokens) behind real FlowServeService servers, and a scheduler stand-in that
routes over the instances a test registers. An instance "dies" by its server stopping with no
grace, which breaks the stream as a killed process does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from deepserve.completions.dispatcher import ChoiceDelta, Dispatcher
from deepserve.completions.migration import MIGRATIONS
from deepserve.completions.prepared import GenerationJob, Prompt
from deepserve.completions.upstream import EngineStubs, SchedulerClient
from deepserve.errors import Unavailable
from deepserve.flowserve.engine.async_engine import AsyncEngine, EngineConfig
from deepserve.flowserve.engine.step_plan import StepPlan
from deepserve.flowserve.testing.fake_executor import FakeExecutor
from deepserve.records import Role
from deepserve.rpc.server import GrpcService, start_grpc_server
from deepserve.sampling_params import SamplingParams
from deepserve.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from tests.unit.flowserve.disagg_support import MODEL, Served, serve, settings

pytestmark = pytest.mark.timeout(60)

VOCAB = 97
BS = 4
PROMPT = [(j * 7 + 3) % VOCAB for j in range(9)]


class SlowFakeExecutor(FakeExecutor):
    """The fake executor with a pause per step, so tokens arrive one by one."""

    def _run(self, plan: StepPlan):  # type: ignore[no-untyped-def]
        time.sleep(0.02)
        return super()._run(plan)


def make_engine() -> AsyncEngine:
    config = EngineConfig(
        block_size=BS,
        num_gpu_blocks=128,
        max_num_seqs=8,
        step_token_budget=64,
        max_model_len=128,
        vocab_size=VOCAB,
    )
    return AsyncEngine(config, SlowFakeExecutor(128, BS, VOCAB))


class PoolScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Routes to the first instance of each role not excluded: colocated, else prefill+decode."""

    def __init__(self) -> None:
        self.instances: list[common_pb2.Instance] = []
        self.excluded: list[list[str]] = []
        self.reports: list[str] = []
        self.service: GrpcService | None = None

    async def start(self) -> str:
        self.service = await start_grpc_server(
            [lambda s: scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(self, s)],
            ["deepserve.v1.SchedulerService"],
            host="127.0.0.1",
            port=0,
        )
        return f"127.0.0.1:{self.service.port}"

    async def Route(
        self, request: scheduler_pb2.RouteRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.RouteResponse:
        self.excluded.append(list(request.exclude_instance_ids))
        live = [i for i in self.instances if i.instance_id not in request.exclude_instance_ids]
        by_role = {role: [i for i in live if i.role == role] for role in (1, 2, 3)}
        if by_role[common_pb2.INSTANCE_ROLE_PREFILL] and by_role[common_pb2.INSTANCE_ROLE_DECODE]:
            chosen = [by_role[2][0], by_role[3][0]]
        elif by_role[common_pb2.INSTANCE_ROLE_COLOCATED]:
            chosen = [by_role[1][0]]
        elif by_role[common_pb2.INSTANCE_ROLE_DECODE]:
            chosen = [by_role[3][0]]  # a decode instance can serve alone too
        else:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no live instance")
        return scheduler_pb2.RouteResponse(instances=chosen, disaggregated=len(chosen) > 1)

    async def ReportInstanceFailure(
        self,
        request: scheduler_pb2.ReportInstanceFailureRequest,
        context: grpc.aio.ServicerContext,
    ) -> scheduler_pb2.ReportInstanceFailureResponse:
        self.reports.append(request.instance_id)
        return scheduler_pb2.ReportInstanceFailureResponse(known=True)


class Cluster:
    """Engines behind gRPC, a scheduler and a dispatcher over them."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.scheduler = PoolScheduler()
        self.served: dict[str, Served] = {}
        self.client: SchedulerClient | None = None
        self.engines = EngineStubs()

    async def add(self, instance_id: str, role: Role = Role.COLOCATED) -> Served:
        served = await serve(make_engine(), settings(self.tmp_path), role)
        self.served[instance_id] = served
        proto_role = {
            Role.COLOCATED: common_pb2.INSTANCE_ROLE_COLOCATED,
            Role.PREFILL: common_pb2.INSTANCE_ROLE_PREFILL,
            Role.DECODE: common_pb2.INSTANCE_ROLE_DECODE,
        }[role]
        self.scheduler.instances.append(
            common_pb2.Instance(
                instance_id=instance_id, model=MODEL, role=proto_role, address=served.address
            )
        )
        return served

    async def start(self) -> None:
        self.client = SchedulerClient(await self.scheduler.start(), timeout_s=5)

    def dispatcher(self, max_migrations: int = 2) -> Dispatcher:
        assert self.client is not None
        return Dispatcher(self.client, self.engines, retries=1, max_migrations=max_migrations)

    async def kill(self, instance_id: str) -> None:
        await self.served[instance_id].server.stop(0)

    async def close(self) -> None:
        for served in self.served.values():
            await served.stop()
            served.engine.shutdown()
        await self.engines.close()
        if self.client is not None:
            await self.client.close()
        if self.scheduler.service is not None:
            await self.scheduler.service.server.stop(0)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    (tmp_path / "shm").mkdir(exist_ok=True)
    c = Cluster(tmp_path / "shm")
    yield c
    await c.close()


def job(params: SamplingParams, n: int = 1) -> GenerationJob:
    return GenerationJob(
        request_id=f"req-{time.monotonic_ns()}",
        endpoint="text",
        tenant="t",
        model=MODEL,
        prompts=[Prompt(list(PROMPT))],
        sampling=params,
        n=n,
        deadline=asyncio.get_running_loop().time() + 30,
    )


async def run(
    dispatcher: Dispatcher,
    j: GenerationJob,
    *,
    kill_after: int | None = None,
    kill: Cluster | None = None,
    victim: str = "",
) -> dict[int, list[ChoiceDelta]]:
    """Streams the job; once `kill_after` tokens of any choice arrived, kills `victim`."""
    targets = await dispatcher.route_all(j)
    deltas: dict[int, list[ChoiceDelta]] = {}
    seen = 0
    async for delta in dispatcher.stream(j, targets):
        deltas.setdefault(delta.index, []).append(delta)
        seen += len(delta.token_ids)
        if kill_after is not None and seen >= kill_after and kill is not None:
            kill_after = None
            await kill.kill(victim)
    return deltas


def tokens(deltas: list[ChoiceDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def migrated(model: str) -> float:
    return MIGRATIONS.labels(model, "migrated")._value.get()


SEEDED = SamplingParams(temperature=2.0, seed=42, max_tokens=16)


async def test_stream_continues_on_another_instance_with_the_same_seeded_tokens(
    cluster: Cluster,
) -> None:
    await cluster.add("a")
    await cluster.add("b")
    await cluster.start()
    dispatcher = cluster.dispatcher()
    expected = tokens((await run(dispatcher, job(SEEDED)))[0])  # on "a", uninterrupted
    assert len(expected) == 16
    assert expected != FakeExecutor.reference(PROMPT, 16, VOCAB)  # the seed decided
    before = migrated(MODEL)

    deltas = (await run(dispatcher, job(SEEDED), kill_after=5, kill=cluster, victim="a"))[0]

    assert tokens(deltas) == expected  # nothing lost, nothing repeated, same seeded draws
    last = deltas[-1]
    assert last.finish_reason == "length"
    assert last.prompt_tokens == len(PROMPT) and last.completion_tokens == 16
    assert sum(1 for d in deltas if d.finish_reason) == 1
    assert cluster.scheduler.excluded[-1] == ["a"]
    await asyncio.sleep(0.1)  # the failure report is sent in the background
    assert cluster.scheduler.reports == ["a"]
    assert migrated(MODEL) == before + 1


async def test_every_choice_of_a_fanout_migrates(cluster: Cluster) -> None:
    await cluster.add("a")
    await cluster.add("b")
    await cluster.start()
    dispatcher = cluster.dispatcher()
    params = SamplingParams(temperature=0.0, max_tokens=12)
    deltas = await run(dispatcher, job(params, n=3), kill_after=4, kill=cluster, victim="a")
    expected = FakeExecutor.reference(PROMPT, 12, VOCAB)
    assert sorted(deltas) == [0, 1, 2]
    for choice in deltas.values():
        assert tokens(choice) == expected
        assert choice[-1].completion_tokens == 12


async def test_migration_limit_ends_the_stream_with_the_error(cluster: Cluster) -> None:
    await cluster.add("a")
    await cluster.add("b")
    await cluster.start()
    got: list[int] = []
    with pytest.raises(Unavailable) as err:
        async for delta in cluster.dispatcher(max_migrations=0).stream(
            j := job(SEEDED), await cluster.dispatcher().route_all(j)
        ):
            got.extend(delta.token_ids)
            if len(got) >= 3:
                await cluster.kill("a")
    assert "mid-stream" in err.value.message
    assert 3 <= len(got) < 16


async def test_no_instance_left_ends_the_stream_with_the_error(cluster: Cluster) -> None:
    await cluster.add("a")
    await cluster.start()
    with pytest.raises(Unavailable) as err:
        await run(cluster.dispatcher(), job(SEEDED), kill_after=3, kill=cluster, victim="a")
    assert "mid-stream" in err.value.message


async def test_decode_death_resumes_on_another_decode_instance(cluster: Cluster) -> None:
    await cluster.add("p", Role.PREFILL)
    await cluster.add("d1", Role.DECODE)
    await cluster.add("d2", Role.DECODE)
    await cluster.start()
    dispatcher = cluster.dispatcher()
    colocated = make_engine()
    try:
        expected = [
            t async for o in colocated.generate("ref", PROMPT, SEEDED) for t in o.new_token_ids
        ]
    finally:
        colocated.shutdown()
    j = job(SEEDED)
    targets = await dispatcher.route_all(j)
    assert targets[0].prefill is not None and targets[0].instance.instance_id == "d1"
    deltas = (await run(dispatcher, j, kill_after=4, kill=cluster, victim="d1"))[0]
    assert tokens(deltas) == expected
    assert cluster.scheduler.excluded[-1] == ["d1"]
    # The resumed request ran on d2 alone: it computed prompt + tokens itself.
    assert cluster.served["d2"].shell.disagg.received.transfers == 0


async def test_prefill_death_redoes_the_prefill_elsewhere(cluster: Cluster) -> None:
    await cluster.add("p1", Role.PREFILL)
    await cluster.add("p2", Role.PREFILL)
    await cluster.add("d", Role.DECODE)
    await cluster.start()
    await cluster.kill("p1")
    deltas = (await run(cluster.dispatcher(), job(SEEDED)))[0]
    assert len(tokens(deltas)) == 16
    assert cluster.scheduler.excluded[-1] == ["p1"]
    assert cluster.served["d"].shell.disagg.received.transfers == 1
