"""`deepserve up` end to end. Starts real processes: etcd, valkey-server, scheduler, jobmgr,
podpool, gateway and a flowserve pod (via the launcher), then kills and restarts them.

The tests share the cluster. Each test puts back what it changed (a job it created is deleted, a
model it loaded is unloaded; a process it killed is restarted by `up` or replaced by podpool),
and each starts once the cluster is as `up` left it (`settled`), so each passes alone and in any
order."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from deepserve import records
from deepserve.cluster.layout import LAUNCHED_SERVICES, SERVICES
from deepserve.rpc.client import insecure_channel
from deepserve.rpc.health_check import check_health
from deepserve.store.etcd import EtcdStore
from deepserve.v1 import (
    common_pb2,
    flowserve_pb2,
    flowserve_pb2_grpc,
    jobmgr_pb2,
    jobmgr_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from tests.cluster_harness import RunningCluster, local_cluster
from tests.polling import eventually as wait_until
from tests.tiny_model import make_tiny_llama

pytestmark = pytest.mark.integration

LEASE_TTL_S = 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    with local_cluster(tmp_path_factory.mktemp("up"), lease_ttl_s=LEASE_TTL_S) as running:
        yield running


@pytest.fixture
async def settled(cluster: RunningCluster) -> RunningCluster:
    """The cluster once it is as `up` left it: one healthy process per launched service, one warm
    pod and no other, and no record of a killed process left (its lease expired)."""
    await wait_until(lambda: _settled(cluster), 60, interval_s=0.25)
    return cluster


async def _settled(cluster: RunningCluster) -> bool:
    async with EtcdStore(cluster.layout.etcd_endpoint) as etcd:
        found, _ = await records.services(etcd).list()
    services = [v.record for v in found]
    launched = sorted(s.service for s in services if s.service != "flowserve")
    if launched != sorted(LAUNCHED_SERVICES):
        return False
    if any(cluster.pids().get(s.service) != s.pid for s in services if s.service != "flowserve"):
        return False
    health = await asyncio.gather(*(check_health(s.address) for s in services))
    if any(h != "SERVING" for h in health):
        return False
    all_pods = await pods(cluster)
    flowserve = {s.pid for s in services if s.service == "flowserve"}
    return [p.state for p in all_pods] == [records.PodState.WARM] and flowserve == {
        p.pid for p in all_pods
    }


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


async def pods(cluster: RunningCluster) -> list[records.PodRecord]:
    async with EtcdStore(cluster.layout.etcd_endpoint) as etcd:
        found, _ = await records.pods(etcd).list()
    return [v.record for v in found]


async def warm_pods(cluster: RunningCluster) -> list[records.PodRecord]:
    return [p for p in await pods(cluster) if p.state == records.PodState.WARM]


async def scheduler_view(cluster: RunningCluster) -> scheduler_pb2.ListInstancesResponse:
    async with insecure_channel(cluster.layout.address("scheduler"), traced=False) as ch:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
        return await stub.ListInstances(scheduler_pb2.ListInstancesRequest(), timeout=5)


async def load_model(pod: records.PodRecord, model: Path) -> str:
    async with insecure_channel(pod.address, traced=False) as ch:
        stub = flowserve_pb2_grpc.FlowServeServiceStub(ch)
        reply = await stub.LoadModel(
            flowserve_pb2.LoadModelRequest(
                model=str(model), role=common_pb2.INSTANCE_ROLE_COLOCATED
            ),
            timeout=120,
        )
    return reply.instance_id


async def healthy(cluster: RunningCluster, service: str) -> bool:
    return await check_health(cluster.layout.address(service)) == "SERVING"


async def restarted(cluster: RunningCluster, service: str, old_pid: int) -> bool:
    pid = cluster.pids().get(service)
    return bool(pid and pid != old_pid and await healthy(cluster, service))


async def test_every_service_is_serving_and_status_reports_them(settled: RunningCluster) -> None:
    cluster = settled
    for service in LAUNCHED_SERVICES:
        assert await healthy(cluster, service), service
    warm = await wait_until(lambda: warm_pods(cluster), 30)
    assert await check_health(warm[0].address) == "SERVING"
    out = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "deepserve.cli.main",
            "status",
            "--run-dir",
            str(cluster.layout.run_dir),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert "SERVICES (5)" in out.stdout
    for service in SERVICES:
        assert service in out.stdout


async def test_reflection_lists_the_api(settled: RunningCluster) -> None:
    cluster = settled
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with insecure_channel(cluster.layout.address("jobmgr"), traced=False) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for reply in stub.ServerReflectionInfo(iter([request])):
            names = {s.name for s in reply.list_services_response.service}
            break
    assert "deepserve.v1.JobManagerService" in names
    assert "grpc.health.v1.Health" in names


async def test_jobs_survive_a_jobmgr_kill(settled: RunningCluster) -> None:
    cluster = settled
    address = cluster.layout.address("jobmgr")
    spec = jobmgr_pb2.JobSpec(
        kind=jobmgr_pb2.JOB_KIND_SERVING,
        serving=jobmgr_pb2.ServingSpec(model="some-model", replicas=2, max_replicas=4),
    )
    async with insecure_channel(address, traced=False) as ch:
        stub = jobmgr_pb2_grpc.JobManagerServiceStub(ch)
        watch = stub.WatchJobs(jobmgr_pb2.WatchJobsRequest())
        created = (await stub.CreateJob(jobmgr_pb2.CreateJobRequest(spec=spec), timeout=5)).job
        async for change in watch:  # the watch pushes the new job
            if change.job.job_id == created.job_id:
                break
        watch.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.ScaleJob(
                jobmgr_pb2.ScaleJobRequest(job_id=created.job_id, replicas=9), timeout=5
            )
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "replicas" in (bad.value.details() or "")

    old_pid = cluster.pids()["jobmgr"]
    os.kill(old_pid, signal.SIGKILL)
    for other in ("gateway", "scheduler", "podpool"):
        await wait_until(lambda other=other: healthy(cluster, other), 10)
    await wait_until(lambda: restarted(cluster, "jobmgr", old_pid), 30)
    async with insecure_channel(address, traced=False) as ch:
        stub = jobmgr_pb2_grpc.JobManagerServiceStub(ch)
        got = (await stub.GetJob(jobmgr_pb2.GetJobRequest(job_id=created.job_id), timeout=5)).job
    assert got.spec.serving.replicas == 2
    assert [e.reason for e in got.events][:1] == ["Created"]
    await delete_job(address, created.job_id)


async def delete_job(address: str, job_id: str) -> None:
    """Deletes a job and waits until it is gone (its tasks ended, their pods released)."""
    async with insecure_channel(address, traced=False) as ch:
        stub = jobmgr_pb2_grpc.JobManagerServiceStub(ch)
        await stub.DeleteJob(jobmgr_pb2.DeleteJobRequest(job_id=job_id), timeout=10)

        async def gone() -> bool:
            listed = await stub.ListJobs(jobmgr_pb2.ListJobsRequest(), timeout=5)
            return job_id not in {j.job_id for j in listed.jobs}

        await wait_until(gone, 60)


async def test_pod_and_instance_vanish_within_lease_ttl_after_sigkill(
    settled: RunningCluster, tiny_model: Path
) -> None:
    cluster = settled
    pod = (await wait_until(lambda: warm_pods(cluster), 30))[0]
    before = await scheduler_view(cluster)

    instance_id = await load_model(pod, tiny_model)
    view = await wait_until(lambda: _scheduler_has(cluster, instance_id, present=True), 10)
    assert view.instances_added == before.instances_added + 1

    # The gateway lists the model while an instance serves it (once its own watch has the
    # instance: the scheduler's having it says nothing about the gateway's).
    async def listed() -> bool:
        body = await asyncio.to_thread(_get, f"{cluster.layout.gateway_url}/v1/models")
        return str(tiny_model) in [m["id"] for m in json.loads(body)["data"]]

    await wait_until(listed, 10)

    os.kill(pod.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    view = await wait_until(
        lambda: _scheduler_has(cluster, instance_id, present=False), timeout_s=LEASE_TTL_S + 5
    )
    assert view.instances_removed == before.instances_removed + 1
    assert not await _pods_with_pid(cluster, pod.pid)
    assert time.monotonic() - killed_at < LEASE_TTL_S + 5
    # podpool refills: a new warm pod registers.
    await wait_until(lambda: _warm_pods_except(cluster, pod.pod_id), 60)


async def test_scheduler_restart_restores_its_view_from_etcd(
    settled: RunningCluster, tiny_model: Path
) -> None:
    cluster = settled
    pod = (await wait_until(lambda: warm_pods(cluster), 60))[0]
    instance_id = await load_model(pod, tiny_model)
    try:
        await wait_until(lambda: _scheduler_has(cluster, instance_id, present=True), timeout_s=10)
        old_pid = cluster.pids()["scheduler"]
        os.kill(old_pid, signal.SIGKILL)
        assert await check_health(pod.address) == "SERVING"
        await wait_until(lambda: restarted(cluster, "scheduler", old_pid), 30)
        view = await wait_until(lambda: _scheduler_has(cluster, instance_id, present=True), 10)
        assert view.instances_added >= 1  # learned from etcd by the new process, not pushed again
    finally:
        await unload_model(pod)


async def unload_model(pod: records.PodRecord) -> None:
    """Hands a pod this module loaded a model into back to the pool as warm."""
    async with insecure_channel(pod.address, traced=False) as ch:
        stub = flowserve_pb2_grpc.FlowServeServiceStub(ch)
        await stub.UnloadModel(flowserve_pb2.UnloadModelRequest(), timeout=60)


async def _warm_pods_except(cluster: RunningCluster, pod_id: str) -> list[records.PodRecord]:
    return [p for p in await warm_pods(cluster) if p.pod_id != pod_id]


async def _pods_with_pid(cluster: RunningCluster, pid: int) -> list[records.PodRecord]:
    return [p for p in await pods(cluster) if p.pid == pid]


async def _scheduler_has(
    cluster: RunningCluster, instance_id: str, *, present: bool
) -> scheduler_pb2.ListInstancesResponse | None:
    try:
        view = await scheduler_view(cluster)
    except grpc.aio.AioRpcError:
        return None
    ids = {i.instance_id for i in view.instances}
    return view if (instance_id in ids) == present else None


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read()
