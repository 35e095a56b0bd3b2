"""Fast scaling end to end. Starts real processes through `deepserve up` (etcd, valkey-server,
gateway, jobmgr, scheduler, podpool and its FlowServe pods) serving a tiny random Llama.

One scenario on one cluster: a request to an autoscaled deployment at zero replicas is held by
the gateway and served once the autoscaler brought up the first instance (weights from disk),
whose task in etcd shows the five scale-up steps; with no traffic it scales back to zero; a
second replica of another deployment forks its weights from the first, which leaves a DRAM copy
that a third replica maps, skipping the warm-up request (`deepserve job` shows the steps and
sources); a deployment that cannot come up answers 503 + Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from deepserve.rpc.client import insecure_channel
from deepserve.scaling.weights_cache import WeightsCacheLayout
from deepserve.v1 import common_pb2, jobmgr_pb2_grpc
from deepserve.v1 import jobmgr_pb2 as pb
from tests.cluster_harness import RunningCluster, local_cluster
from tests.polling import eventually
from tests.tiny_model import make_tiny_llama

pytestmark = pytest.mark.integration
STEPS = ["pod_acquired", "engine_started", "weights_loaded", "warmed_up", "visible"]


def spec(model: str, *, replicas: int = 0, max_replicas: int, autoscale: bool) -> pb.JobSpec:
    return pb.JobSpec(
        kind=pb.JOB_KIND_SERVING,
        serving=pb.ServingSpec(
            model=model,
            replicas=replicas,
            min_replicas=0,
            max_replicas=max_replicas,
            autoscaling=pb.AutoscalingPolicy(
                enabled=autoscale, scale_to_zero_after_s=2.0, scale_down_cooldown_s=300
            ),
        ),
    )


def running(tasks: list[pb.Task]) -> list[pb.Task]:
    return [t for t in tasks if t.state == pb.TASK_STATE_RUNNING and t.scale_steps]


@pytest.fixture
def cache_dir() -> Path:
    # On tmpfs, like the real cache; removed afterwards.
    path = Path("/dev/shm") / f"deepserve-test-weights-{uuid.uuid4().hex[:8]}"
    yield path  # type: ignore[misc]
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def test_scale_from_zero_fork_dram_and_back_to_zero(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = str(make_tiny_llama(tmp_path / "tiny-llama"))
    monkeypatch.setenv("DEEPSERVE_PODPOOL_WEIGHTS_CACHE_DIR", str(cache_dir))
    # No background DRAM copies: each replica's weights source is then deterministic.
    monkeypatch.setenv("DEEPSERVE_PODPOOL_DRAM_RECENT_MODELS", "0")
    monkeypatch.setenv("DEEPSERVE_FLOWSERVE_KV_CACHE_BLOCKS", "64")
    monkeypatch.setenv("DEEPSERVE_FLOWSERVE_LOAD_REPORT_INTERVAL_S", "0.2")
    monkeypatch.setenv("DEEPSERVE_JOBMGR_AUTOSCALE_INTERVAL_S", "0.3")
    monkeypatch.setenv("DEEPSERVE_GATEWAY_SCALE_FROM_ZERO_TIMEOUT_S", "8")
    with local_cluster(tmp_path / "run", model="none") as cluster:
        asyncio.run(scenario(cluster, model, cache_dir))


async def scenario(cluster: RunningCluster, model: str, cache_dir: Path) -> None:
    async with insecure_channel(cluster.layout.address("jobmgr"), traced=False) as channel:
        jobs = jobmgr_pb2_grpc.JobManagerServiceStub(channel)

        def tasks_of(job_id: str) -> Callable[[], Awaitable[list[pb.Task]]]:
            async def tasks() -> list[pb.Task]:
                return list((await jobs.GetJob(pb.GetJobRequest(job_id=job_id))).tasks)

            return tasks

        # 1. Scale from zero: the gateway holds the request until the first instance is up.
        # One replica at most: a second would fork, and its copy in the weights cache would
        # turn step 3's fork into a DRAM load.
        await jobs.CreateJob(
            pb.CreateJobRequest(spec=spec(model, max_replicas=1, autoscale=True), job_id="auto")
        )
        async with httpx.AsyncClient(base_url=cluster.layout.gateway_url, timeout=120) as http:
            reply = await http.post(
                "/v1/completions",
                json={"model": model, "prompt": "hello", "max_tokens": 4, "ignore_eos": True},
            )
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 4
        first = running(await eventually(lambda: _running(tasks_of("auto"), 1), 30))[0]
        assert [s.step for s in first.scale_steps] == STEPS
        assert first.weights_source == common_pb2.WEIGHTS_SOURCE_DISK
        job = (await jobs.GetJob(pb.GetJobRequest(job_id="auto"))).job
        assert any(e.reason == "Autoscaled" and "from zero" in e.message for e in job.events)

        # 2. No traffic: back to zero replicas, the task gone.
        async def at_zero() -> bool:
            job = (await jobs.GetJob(pb.GetJobRequest(job_id="auto"))).job
            return job.spec.serving.replicas == 0 and not await tasks_of("auto")()

        await eventually(at_zero, 30)

        # 3. A fixed deployment: its second replica forks the weights from the first (no DRAM
        # copy exists), which leaves a DRAM copy on this host that a third replica maps.
        assert WeightsCacheLayout(cache_dir).entries() == []
        fixed = spec(model, replicas=1, max_replicas=3, autoscale=False)
        await jobs.CreateJob(pb.CreateJobRequest(spec=fixed, job_id="fixed"))
        tasks = tasks_of("fixed")
        await eventually(lambda: _running(tasks, 1), 60)
        sources = {}
        for replicas in (2, 3):
            await jobs.ScaleJob(pb.ScaleJobRequest(job_id="fixed", replicas=replicas))
            placed = await eventually(lambda n=replicas: _running(tasks, n), 60)
            newest = max(placed, key=lambda t: t.created_at_unix)
            sources[replicas] = newest.weights_source
            warm_up = next(s.detail for s in newest.scale_steps if s.step == "warmed_up")
            if replicas == 2:  # a fork: the dummy request runs
                assert warm_up == "one dummy request", warm_up
            else:  # a DRAM copy and a configured KV size: nothing new to prove
                assert warm_up.startswith("skipped: DRAM copy"), warm_up
            if replicas == 2:
                copies = WeightsCacheLayout(cache_dir).entries()
                assert [c.origin for c in copies] == ["fork"]
        assert sources == {2: common_pb2.WEIGHTS_SOURCE_FORK, 3: common_pb2.WEIGHTS_SOURCE_DRAM}

        argv = [sys.executable, "-m", "deepserve.cli.main", "job", "fixed",
                "--run-dir", str(cluster.layout.run_dir)]  # fmt: skip
        done = await asyncio.to_thread(
            subprocess.run, argv, capture_output=True, text=True, timeout=30, check=True
        )
        for step in STEPS:
            assert step in done.stdout, done.stdout
        assert "weights: fork" in done.stdout and "weights: dram" in done.stdout, done.stdout

        # 4. A deployment that cannot come up: the held request gets 503 + Retry-After.
        missing = str(Path(model).parent / "no-such-model")
        gone = spec(missing, max_replicas=1, autoscale=True)
        await jobs.CreateJob(pb.CreateJobRequest(spec=gone, job_id="gone"))
        async with httpx.AsyncClient(base_url=cluster.layout.gateway_url, timeout=60) as http:
            await asyncio.sleep(0.5)  # the gateway's watch of deployments is pushed; ample
            reply = await http.post(
                "/v1/completions", json={"model": missing, "prompt": "hi", "max_tokens": 1}
            )
        assert reply.status_code == 503, reply.text
        assert int(reply.headers["retry-after"]) > 0
        assert "zero replicas" in json.dumps(reply.json())


async def _running(tasks: Callable[[], Awaitable[list[pb.Task]]], n: int) -> list[pb.Task] | None:
    found = running(await tasks())
    return found if len(found) >= n else None
