"""The control plane end to end. Starts real processes: etcd and valkey-server (session
fixtures), one podpool (which starts FlowServe pods as processes), two jobmgr replicas and two
scheduler replicas; pods serve a tiny random Llama. The tests share one plane and one colocated
deployment (the `colocated` fixture creates it on first use), and each passes alone and in any
order: none assumes what another test did to the shared deployment."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from deepserve import records
from deepserve.jobmgr.task_store import TaskStore
from deepserve.prefix_hash import prompt_block_hashes
from deepserve.processes import ManagedProcess, free_port
from deepserve.records import PodState
from deepserve.rpc.client import insecure_channel
from deepserve.rpc.errors import FIELD_KEY
from deepserve.rpc.health_check import wait_serving
from deepserve.store.election import LeaderElection
from deepserve.store.etcd import EtcdStore
from deepserve.store.keys import Keys
from deepserve.v1 import (
    common_pb2,
    flowserve_pb2,
    flowserve_pb2_grpc,
    jobmgr_pb2,
    jobmgr_pb2_grpc,
    podpool_pb2,
    podpool_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from tests.polling import eventually
from tests.tiny_model import make_tiny_llama

pytestmark = pytest.mark.integration

TTL_S = 2
BLOCK = 16


@dataclass
class Plane:
    etcd_endpoint: str
    model: str
    podpool: str
    jobmgrs: dict[str, ManagedProcess] = field(default_factory=dict)  # address -> process
    schedulers: list[str] = field(default_factory=list)
    log_dir: Path = Path()

    def live_jobmgr(self) -> str:
        return next(a for a, p in self.jobmgrs.items() if p.alive())


def start(name: str, module: str, env: dict[str, str], log_dir: Path) -> ManagedProcess:
    return ManagedProcess(
        name, [sys.executable, "-m", module], log_dir / f"{name}.log", env=env
    ).start()


@pytest.fixture(scope="module")
def plane(
    etcd_endpoint: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Plane]:
    root = tmp_path_factory.mktemp("control-plane")
    model = str(make_tiny_llama(root / "tiny-llama"))
    common = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "DEEPSERVE_ETCD_ENDPOINT": etcd_endpoint,
        "DEEPSERVE_REDIS_URL": redis_url,
        "DEEPSERVE_LEASE_TTL_S": str(TTL_S),
        # Nothing of this run outside its temporary folder.
        "DEEPSERVE_FILES_ROOT": str(root / "files"),
    }
    podpool_port = free_port()
    pool_env = {
        **common,
        "DEEPSERVE_PODPOOL_GRPC_PORT": str(podpool_port),
        "DEEPSERVE_PODPOOL_WARM_PODS": "1",
        "DEEPSERVE_PODPOOL_POD_LOG_DIR": str(root / "pods"),
        "DEEPSERVE_PODPOOL_POD_DEVICE": "cpu",
        # Inherited by every pod the pool starts.
        "DEEPSERVE_FLOWSERVE_KV_CACHE_BLOCKS": "128",
        "DEEPSERVE_FLOWSERVE_MAX_NUM_SEQS": "2",
        "DEEPSERVE_FLOWSERVE_LOAD_REPORT_INTERVAL_S": "0.2",
        "OMP_NUM_THREADS": "1",
    }
    procs = [start("podpool", "deepserve.podpool", pool_env, root)]
    p = Plane(etcd_endpoint, model, f"127.0.0.1:{podpool_port}", log_dir=root)
    for n in range(2):
        port = free_port()
        env = {
            **common,
            "DEEPSERVE_JOBMGR_GRPC_PORT": str(port),
            "DEEPSERVE_JOBMGR_PODPOOL_ADDRESS": p.podpool,
            "DEEPSERVE_JOBMGR_ELECTION_TTL_S": str(TTL_S),
            "DEEPSERVE_JOBMGR_RETRY_BACKOFF_S": "0.5",
        }
        proc = start(f"jobmgr{n}", "deepserve.jobmgr", env, root)
        procs.append(proc)
        p.jobmgrs[f"127.0.0.1:{port}"] = proc
    for n in range(2):
        port = free_port()
        env = {**common, "DEEPSERVE_SCHEDULER_GRPC_PORT": str(port)}
        procs.append(start(f"scheduler{n}", "deepserve.scheduler", env, root))
        p.schedulers.append(f"127.0.0.1:{port}")
    try:
        for address in [p.podpool, *p.jobmgrs, *p.schedulers]:
            if not asyncio.run(wait_serving(address, 60)):
                pytest.fail(f"{address} did not start:\n{_tails(procs)}")
        yield p
    finally:
        for proc in reversed(procs):
            proc.stop(timeout_s=20)
        asyncio.run(_remove_own_records(p))


def _tails(procs: list[ManagedProcess]) -> str:
    return "\n".join(f"--- {p.name}\n{p.tail(15)}" for p in procs)


async def _remove_own_records(plane: Plane) -> None:
    """Deletes what this module's plane left in the shared etcd: its jobs and their tasks, and
    the records of its pods and instances a SIGKILL left until their leases expire. Only these:
    the etcd is the session's, and its other keys are not this module's to remove."""
    async with EtcdStore(plane.etcd_endpoint) as etcd:
        for job_id in MODULE_JOBS:
            await etcd.delete(Keys.job(job_id))
            await etcd.delete_prefix(Keys.tasks_prefix(job_id))
        instances, _ = await records.instances(etcd).list()
        for instance in instances:
            if instance.record.model == plane.model:
                await records.instances(etcd).delete(instance.record.instance_id)
        pods, _ = await records.pods(etcd).list()
        pod_log_dir = plane.log_dir / "pods"
        for pod in pods:
            if pod.record.model == plane.model or _started_by(pod.record, pod_log_dir):
                await records.pods(etcd).delete(pod.record.pod_id)


def _started_by(pod: records.PodRecord, pod_log_dir: Path) -> bool:
    """Whether this module's pool started the pod (its local backend logs each pod there)."""
    return (pod_log_dir / f"{pod.pod_id}.log").exists()


@pytest.fixture
async def etcd(plane: Plane) -> AsyncIterator[EtcdStore]:
    async with EtcdStore(plane.etcd_endpoint) as store:
        yield store


async def jobmgr_call(plane: Plane, method: str, request: Any) -> Any:
    async with insecure_channel(plane.live_jobmgr(), traced=False) as channel:
        return await getattr(jobmgr_pb2_grpc.JobManagerServiceStub(channel), method)(request)


async def route(address: str, **kw: Any) -> scheduler_pb2.RouteResponse:
    async with insecure_channel(address, traced=False) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        return await stub.Route(scheduler_pb2.RouteRequest(**kw))


async def generate(address: str, request_id: str, prompt: list[int], max_tokens: int) -> int:
    async with insecure_channel(address, traced=False) as channel:
        stub = flowserve_pb2_grpc.FlowServeServiceStub(channel)
        request = flowserve_pb2.GenerateRequest(
            request_id=request_id,
            prompt_token_ids=prompt,
            sampling=common_pb2.SamplingParams(
                temperature=0, max_tokens=max_tokens, ignore_eos=True
            ),
        )
        tokens = 0
        async for reply in stub.Generate(request):
            tokens += len(reply.token_ids)
        return tokens


def serving_spec(plane: Plane, **kw: Any) -> jobmgr_pb2.JobSpec:
    return jobmgr_pb2.JobSpec(
        kind=jobmgr_pb2.JOB_KIND_SERVING, serving=jobmgr_pb2.ServingSpec(model=plane.model, **kw)
    )


async def ready_job(
    plane: Plane, job_id: str, replicas: int | None = None
) -> jobmgr_pb2.GetJobResponse:
    """The job once `replicas` (default: its desired count) are ready."""

    async def probe() -> jobmgr_pb2.GetJobResponse | None:
        reply = await jobmgr_call(plane, "GetJob", jobmgr_pb2.GetJobRequest(job_id=job_id))
        want = reply.job.spec.serving.replicas if replicas is None else replicas
        return reply if reply.job.status.ready_replicas == want else None

    return await eventually(probe, timeout_s=120)


async def instance_ids(address: str, model: str) -> set[str]:
    async with insecure_channel(address, traced=False) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        reply = await stub.ListInstances(scheduler_pb2.ListInstancesRequest(model=model))
    return {i.instance_id for i in reply.instances}


JOB = "cp-colocated"
DISAGG_JOB = "cp-disagg"
MODULE_JOBS = (JOB, DISAGG_JOB)  # every job this module creates


@dataclass(frozen=True)
class Deployment:
    """The shared colocated deployment as it stood when it first became ready."""

    first_ready: jobmgr_pb2.GetJobResponse


@pytest.fixture(scope="module")
async def colocated(plane: Plane) -> Deployment:
    """Deploys JOB (2 replicas, up to 3) once per module, whichever test asks first."""
    async with EtcdStore(plane.etcd_endpoint) as etcd:
        # Deploy once the pool is warm, so one task gets the warm pod and the other starts cold.
        await eventually(lambda: _has_warm_pod(etcd), timeout_s=90)
    await jobmgr_call(
        plane,
        "CreateJob",
        jobmgr_pb2.CreateJobRequest(
            job_id=JOB, spec=serving_spec(plane, replicas=2, max_replicas=3)
        ),
    )
    return Deployment(await ready_job(plane, JOB, 2))


async def colocated_instances(plane: Plane) -> int:
    """How many colocated instances the shared deployment wants now (tests may have scaled it)."""
    reply = await ready_job(plane, JOB)
    return reply.job.spec.serving.replicas


async def test_deploy_two_replicas_serve(plane: Plane, colocated: Deployment) -> None:
    job = colocated.first_ready
    assert job.job.status.phase == jobmgr_pb2.JOB_PHASE_RUNNING
    running = [t for t in job.tasks if t.state == jobmgr_pb2.TASK_STATE_RUNNING]
    assert len(running) == 2
    task_events = {e.reason for t in running for e in t.events}
    assert {"PodAssigned", "ColdStart"} <= task_events
    now = await ready_job(plane, JOB)
    expected = {t.instance_id for t in now.tasks if t.state == jobmgr_pb2.TASK_STATE_RUNNING}
    for scheduler in plane.schedulers:
        await eventually(lambda s=scheduler: _equals(instance_ids(s, plane.model), expected))
    for n, task in enumerate(t for t in now.tasks if t.state == jobmgr_pb2.TASK_STATE_RUNNING):
        assert await generate(task.address, f"smoke-{n}", [5, 6, 7, 8], 4) == 4


async def _has_warm_pod(etcd: EtcdStore) -> bool:
    pods, _ = await records.pods(etcd).list()
    return any(p.record.state == PodState.WARM for p in pods)


async def _equals(value: Awaitable[Any], expected: Any) -> bool:
    return (await value) == expected


async def test_two_schedulers_answer_the_same(plane: Plane, colocated: Deployment) -> None:
    prompts = [[7] * 48, [9] * 200, list(range(100)), []]
    for n, prompt in enumerate(prompts * 2):
        kw = {
            "request_id": f"same-{n}",
            "model": plane.model,
            "prompt_tokens": len(prompt),
            "max_tokens": 16,
            "prefix_block_hashes": prompt_block_hashes(prompt, BLOCK),
            "block_size": BLOCK,
        }
        # Routing is itself a change of shared state (routed counts, flushed to Redis every
        # 0.1 s) and load reports land every 0.2 s: let both replicas settle on the same view,
        # then ask both at once; retry a pair that a fresh report happened to straddle.
        for _attempt in range(5):
            await asyncio.sleep(0.35)
            a, b = await asyncio.gather(*(route(s, **kw) for s in plane.schedulers))
            if [i.instance_id for i in a.instances] == [i.instance_id for i in b.instances]:
                break
        else:
            raise AssertionError(f"replicas disagree: {a.reason!r} vs {b.reason!r}")
        assert (a.branch, a.disaggregated) == (b.branch, b.disaggregated)


async def test_prefix_affinity_while_balanced_and_spread_when_not(
    plane: Plane, colocated: Deployment
) -> None:
    scheduler = plane.schedulers[0]
    probe = await route(scheduler, request_id="probe", model=plane.model)
    holder = probe.instances[0]
    # The engine's block size travels on its instance record: hash the way it caches.
    block = holder.block_size
    assert block == BLOCK  # the pods' FlowServe default
    prompt = [(i * 7 + 3) % 200 + 3 for i in range(160)]  # 10 full blocks
    await generate(holder.address, "warm-prefix", prompt, 2)
    hashes = prompt_block_hashes(prompt, block)
    shared = prompt_block_hashes(prompt + [11, 12, 13] * 8, block)  # same prefix, longer

    async def routed_to_holder() -> scheduler_pb2.RouteResponse | None:
        reply = await route(
            scheduler, request_id="affine", model=plane.model, prompt_tokens=184,
            prefix_block_hashes=shared, block_size=block,
        )  # fmt: skip
        ok = reply.instances[0].instance_id == holder.instance_id
        # A positive score: the holder's KV events reached the index (not a tie at zero).
        cached = reply.scores.get(holder.instance_id, 0.0) > 0
        locality = reply.branch == scheduler_pb2.ROUTE_BRANCH_LOCALITY
        return reply if ok and cached and locality else None

    affine = await eventually(routed_to_holder, timeout_s=20)
    assert affine.scores[holder.instance_id] == len(hashes)
    assert "longest cached prefix" in affine.reason
    # Load the holder with long requests: the group becomes imbalanced and routing spreads.
    flood = [
        asyncio.create_task(generate(holder.address, f"flood-{n}", [n + 3] * 20, 400))
        for n in range(10)
    ]
    try:

        async def spread() -> scheduler_pb2.RouteResponse | None:
            reply = await route(
                scheduler, request_id="spread", model=plane.model, prompt_tokens=184,
                prefix_block_hashes=shared, block_size=block,
            )  # fmt: skip
            ok = reply.instances[0].instance_id != holder.instance_id
            return reply if ok and reply.branch == scheduler_pb2.ROUTE_BRANCH_LOAD else None

        spread_reply = await eventually(spread, timeout_s=20, interval_s=0.05)
        assert "imbalanced" in spread_reply.reason
    finally:
        for task in flood:
            task.cancel()
        await asyncio.gather(*flood, return_exceptions=True)


async def test_pd_aware_sends_long_prompt_short_output_to_the_pair(
    plane: Plane, colocated: Deployment
) -> None:
    job_id = DISAGG_JOB
    colocated_count = await colocated_instances(plane)
    await jobmgr_call(
        plane,
        "CreateJob",
        jobmgr_pb2.CreateJobRequest(
            job_id=job_id,
            spec=serving_spec(
                plane,
                replicas=1,
                mode=jobmgr_pb2.SERVING_MODE_DISAGGREGATED,
                prefill_instances=1,
                decode_instances=1,
            ),
        ),
    )
    job = await ready_job(plane, job_id, 1)
    roles = sorted(t.role for t in job.tasks)
    assert roles == [common_pb2.INSTANCE_ROLE_PREFILL, common_pb2.INSTANCE_ROLE_DECODE]
    scheduler = plane.schedulers[1]

    async def both_groups() -> bool:
        return len(await instance_ids(scheduler, plane.model)) == colocated_count + 2

    await eventually(both_groups)
    long_short = await route(
        scheduler, request_id="ls", model=plane.model, prompt_tokens=4000, max_tokens=8
    )
    assert long_short.disaggregated
    assert [i.role for i in long_short.instances] == [
        common_pb2.INSTANCE_ROLE_PREFILL,
        common_pb2.INSTANCE_ROLE_DECODE,
    ]
    assert "-> disaggregated" in long_short.pd_reason
    short_long = await route(
        scheduler, request_id="sl", model=plane.model, prompt_tokens=40, max_tokens=400
    )
    assert not short_long.disaggregated
    assert short_long.instances[0].role == common_pb2.INSTANCE_ROLE_COLOCATED
    # Delete: the pair's tasks stop, their pods go back or end, and the job disappears.
    await jobmgr_call(plane, "DeleteJob", jobmgr_pb2.DeleteJobRequest(job_id=job_id))

    async def deleted() -> bool:
        jobs = await jobmgr_call(plane, "ListJobs", jobmgr_pb2.ListJobsRequest())
        return job_id not in {j.job_id for j in jobs.jobs}

    await eventually(deleted, timeout_s=60)
    await eventually(lambda: _len_is(instance_ids(scheduler, plane.model), colocated_count))


async def _len_is(value: Awaitable[Any], n: int) -> bool:
    return len(await value) == n


async def test_sigkilled_pod_stops_receiving_and_is_replaced(
    plane: Plane, etcd: EtcdStore, colocated: Deployment
) -> None:
    job = await ready_job(plane, JOB)
    replicas = job.job.spec.serving.replicas
    victim = job.tasks[0]
    pod = await records.pods(etcd).require(victim.pod_id)
    os.kill(pod.record.pid, signal.SIGKILL)
    for scheduler in plane.schedulers:

        async def gone(s: str = scheduler) -> bool:
            return victim.instance_id not in await instance_ids(s, plane.model)

        await eventually(gone, timeout_s=TTL_S + 10)
    # Once gone from the table, no decision names it.
    for n in range(10):
        reply = await route(plane.schedulers[n % 2], request_id=f"after-{n}", model=plane.model)
        assert victim.instance_id not in {i.instance_id for i in reply.instances}

    async def replaced() -> jobmgr_pb2.GetJobResponse | None:
        reply = await ready_job(plane, JOB)
        ids = {t.instance_id for t in reply.tasks}
        return reply if victim.instance_id not in ids and len(ids) == replicas else None

    after = await eventually(replaced, timeout_s=120)
    reasons = [e.reason for e in after.job.events]
    assert "TaskFailed" in reasons and "TaskReplaced" in reasons


async def test_jobmgr_checks_fine_tuning_and_batch_jobs(plane: Plane) -> None:
    """CreateJob takes every kind; a bad spec or file is INVALID_ARGUMENT naming the field, and
    another tenant's job is NOT_FOUND (a jobmgr process, as the gateway calls it)."""
    tenant = f"t-{uuid.uuid4().hex[:8]}"  # a tenant with no jobs, whatever else etcd holds
    cases = [
        (
            jobmgr_pb2.JobSpec(
                kind=jobmgr_pb2.JOB_KIND_FINE_TUNING,
                fine_tuning=jobmgr_pb2.FineTuningSpec(
                    model=plane.model, training_file="file-x", n_epochs=99, tenant=tenant
                ),
            ),
            "hyperparameters.n_epochs",
        ),
        (
            jobmgr_pb2.JobSpec(
                kind=jobmgr_pb2.JOB_KIND_FINE_TUNING,
                fine_tuning=jobmgr_pb2.FineTuningSpec(
                    model=plane.model, training_file="file-missing", tenant=tenant
                ),
            ),
            "training_file",
        ),
        (
            jobmgr_pb2.JobSpec(
                kind=jobmgr_pb2.JOB_KIND_BATCH,
                batch=jobmgr_pb2.BatchSpec(input_file_id="file-missing", tenant=tenant),
            ),
            "input_file_id",
        ),
    ]
    for spec, field_name in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await jobmgr_call(plane, "CreateJob", jobmgr_pb2.CreateJobRequest(spec=spec))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(caught.value.trailing_metadata() or ()).get(FIELD_KEY) == field_name
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await jobmgr_call(plane, "GetJob", jobmgr_pb2.GetJobRequest(job_id=JOB, tenant=tenant))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await jobmgr_call(plane, "ListJobs", jobmgr_pb2.ListJobsRequest(tenant=tenant))
    assert list(listed.jobs) == []


async def test_jobmgr_leader_dies_and_the_other_takes_over(
    plane: Plane, etcd: EtcdStore, colocated: Deployment
) -> None:
    before = await ready_job(plane, JOB)
    replicas = before.job.spec.serving.replicas
    pods_before = await _pod_counts(plane)
    leader_id = await LeaderElection(etcd, "jobmgr", "observer", TTL_S).leader()
    assert leader_id is not None
    leader_pid = int(leader_id.split("-")[-2])
    leader = next(p for p in plane.jobmgrs.values() if p.pid == leader_pid)
    leader.signal(signal.SIGKILL)
    leader.popen.wait(10)  # type: ignore[union-attr]

    async def new_leader() -> str | None:
        found = await LeaderElection(etcd, "jobmgr", "observer", TTL_S).leader()
        return found if found and found != leader_id else None

    successor = await eventually(new_leader, timeout_s=TTL_S + 10)
    # The successor reconciles: scaling up (or back down, at the deployment's maximum) works.
    target = replicas + 1 if replicas < 3 else replicas - 1
    await jobmgr_call(plane, "ScaleJob", jobmgr_pb2.ScaleJobRequest(job_id=JOB, replicas=target))
    await ready_job(plane, JOB, target)
    instances, _ = await records.instances(etcd).list()
    assert len([i for i in instances if i.record.job_id == JOB]) == target
    if target > replicas:
        creators = {t.record.slot: t.record.created_by for t in await TaskStore(etcd).list(JOB)}
        assert creators[f"r{replicas}-colocated0"] == successor
        # The scale-up took exactly one pod from the pool (warm or cold).
        pods_after = await _pod_counts(plane)
        assert pods_after.warm_hits + pods_after.cold_starts == (
            pods_before.warm_hits + pods_before.cold_starts + 1
        )
        assert pods_after.warm_target == 1


async def _pod_counts(plane: Plane) -> podpool_pb2.ListPodsResponse:
    async with insecure_channel(plane.podpool, traced=False) as channel:
        return await podpool_pb2_grpc.PodPoolServiceStub(channel).ListPods(
            podpool_pb2.ListPodsRequest()
        )
