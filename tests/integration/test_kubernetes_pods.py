"""podpool with the Kubernetes backend, end to end: a real podpool process talks, through the
real kubernetes_asyncio client, to a stand-in API server whose kubelet runs each Pod's
container command as a real process. So the engine Pods are real FlowServe pods: they register
in etcd as every pod does, load a tiny Llama on AcquirePod, serve Generate, and export the
Gateway API Inference Extension metrics on their fixed metrics port at their own Pod IP.

Also: released Pods are deleted, and a podpool killed and restarted adopts its Pods (no new
ones) and deletes the ones that ended while it was away."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_asyncio
from kubernetes_asyncio import client
from prometheus_client.parser import text_string_to_metric_families

from deepserve import records
from deepserve.processes import ManagedProcess, bound_to_parent, free_port
from deepserve.records import PodState
from deepserve.rpc.client import insecure_channel
from deepserve.rpc.health_check import wait_serving
from deepserve.store.etcd import EtcdStore
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
from tests.kube_apiserver import KubeApiServer, Node, ProcessKubelet, kube_apiserver
from tests.polling import eventually
from tests.tiny_model import make_tiny_llama

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

NAMESPACE = "deepserve"
METRICS_PORT = 9400
T = TypeVar("T")


def scrape(address: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    """POSTs JSON; returns the status and the JSON body, or the SSE data lines when streamed."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            text = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    if body.get("stream"):
        return status, [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    return status, json.loads(text)


def gauge(families: dict[str, Any], name: str) -> float:
    return float(families[name].samples[0].value)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("kube-tiny") / "tiny-llama")


class PodPool:
    """A real podpool process with the Kubernetes backend."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.port = int(env["DEEPSERVE_PODPOOL_GRPC_PORT"])
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as out:
            # From the main thread: the parent-death signal is tied to the forking thread.
            self.proc = await asyncio.create_subprocess_exec(
                *bound_to_parent([sys.executable, "-m", "deepserve.podpool"]),
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        if not await wait_serving(f"127.0.0.1:{self.port}", 60):
            pytest.fail(f"podpool did not start:\n{self.log.read_text()}")

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


@pytest_asyncio.fixture
async def cluster(
    etcd_endpoint: str, redis_url: str, tmp_path: Path
) -> AsyncIterator[tuple[KubeApiServer, PodPool, EtcdStore]]:
    kubelet = ProcessKubelet(
        tmp_path / "pods",
        extra_env={
            "DEEPSERVE_FLOWSERVE_KV_CACHE_BLOCKS": "64",
            "DEEPSERVE_FLOWSERVE_THREADS": "1",
        },
    )
    async with kube_apiserver(kubelet, [Node("node-a"), Node("node-b")]) as server:
        server.add_deployment(NAMESPACE, "deepserve-podpool")
        env = {
            **os.environ,
            "DEEPSERVE_ETCD_ENDPOINT": etcd_endpoint,
            "DEEPSERVE_REDIS_URL": redis_url,
            "DEEPSERVE_LEASE_TTL_S": "2",
            "DEEPSERVE_PODPOOL_GRPC_PORT": str(free_port()),
            "DEEPSERVE_PODPOOL_WARM_PODS": "1",
            "DEEPSERVE_PODPOOL_BACKEND": "kubernetes",
            "DEEPSERVE_PODPOOL_KUBE_API_URL": server.url,
            "DEEPSERVE_PODPOOL_KUBE_NAMESPACE": NAMESPACE,
            "DEEPSERVE_PODPOOL_KUBE_POOL_NAME": f"it-{free_port()}",
            "DEEPSERVE_PODPOOL_KUBE_OWNER_DEPLOYMENT": "deepserve-podpool",
            "DEEPSERVE_PODPOOL_KUBE_WEIGHTS_HOST_PATH": str(tmp_path / "node-weights"),
            "DEEPSERVE_PODPOOL_KUBE_METRICS_PORT": str(METRICS_PORT),
            "DEEPSERVE_PODPOOL_KUBE_TERMINATION_GRACE_S": "10",
        }
        pool = PodPool(env, tmp_path / "podpool.log")
        async with EtcdStore(etcd_endpoint) as etcd:
            try:
                await pool.start()
                yield server, pool, etcd
            finally:
                await pool.stop()
                await kubelet.close()


async def warm_kube_pods(server: KubeApiServer, etcd: EtcdStore) -> list[records.PodRecord]:
    found, _ = await records.pods(etcd).list()
    ours = {name for (_, name) in server.pods}
    return [v.record for v in found if v.record.pod_id in ours and v.record.state == PodState.WARM]


async def test_engine_pods_register_serve_export_gaie_metrics_and_are_deleted(
    cluster: tuple[KubeApiServer, PodPool, EtcdStore], tiny_model: Path
) -> None:
    server, pool, etcd = cluster
    warm = await eventually(lambda: warm_kube_pods(server, etcd), 120, "a warm engine Pod")
    pod = warm[0]
    manifest = server.pods[(NAMESPACE, pod.pod_id)]
    # It registered in etcd at its own Pod IP, as any pod registers.
    assert pod.address == f"{manifest['status']['podIP']}:50060"
    owner = manifest["metadata"]["ownerReferences"][0]
    assert owner["uid"] == server.deployments[(NAMESPACE, "deepserve-podpool")]["metadata"]["uid"]

    async with insecure_channel(f"127.0.0.1:{pool.port}") as channel:
        stub = podpool_pb2_grpc.PodPoolServiceStub(channel)
        acquired = await stub.AcquirePod(
            podpool_pb2.AcquirePodRequest(
                task_id="kube-task-1",
                model=str(tiny_model),
                role=common_pb2.INSTANCE_ROLE_COLOCATED,
                job_id="kube-job",
                tensor_parallel_size=1,
            ),
            timeout=180,
        )
    assert acquired.instance_id and acquired.pod.pod_id == pod.pod_id
    # The Pod's labels now say what it serves (for label-selecting routers).
    labelled = await eventually(
        lambda: _async(server.pods[(NAMESPACE, pod.pod_id)]["metadata"]["labels"].get(
            "deepserve.io/model"
        )),
        20,
        "the model label",
    )  # fmt: skip
    assert labelled.endswith("-tiny-llama") and len(labelled) <= 63  # the path, label-safe

    metrics_at = f"{manifest['status']['podIP']}:{METRICS_PORT}"
    idle = await asyncio.to_thread(scrape, metrics_at)
    assert gauge(idle, "vllm:num_requests_running") == 0
    assert gauge(idle, "vllm:num_requests_waiting") == 0
    lora = idle["vllm:lora_requests_info"].samples[0]
    assert set(lora.labels) == {"running_lora_adapters", "waiting_lora_adapters", "max_lora"}
    assert lora.labels["running_lora_adapters"] == "" and lora.value > 0

    async with insecure_channel(pod.address) as channel:
        engine = flowserve_pb2_grpc.FlowServeServiceStub(channel)
        stream = engine.Generate(
            flowserve_pb2.GenerateRequest(
                request_id="gaie-1",
                model=str(tiny_model),
                prompt_token_ids=list(range(10, 60)),
                sampling=common_pb2.SamplingParams(
                    temperature=0.0, max_tokens=400, ignore_eos=True
                ),
            ),
            timeout=120,
        )
        replies = aiter(stream)
        await anext(replies)  # the request is running now, its KV blocks held
        busy = await asyncio.to_thread(scrape, metrics_at)
        stream.cancel()
    assert gauge(busy, "vllm:num_requests_running") == 1
    assert 0 < gauge(busy, "vllm:kv_cache_usage_perc") <= 1
    assert busy["vllm:num_requests_running"].samples[0].labels["model_name"] == str(tiny_model)

    # The OpenAI listener an InferencePool targets: the Gateway proxies requests straight to it.
    http_at = f"http://{manifest['status']['podIP']}:8000"
    model = str(tiny_model)
    status, whole = await asyncio.to_thread(
        post,
        f"{http_at}/v1/completions",
        {"model": model, "prompt": "hello", "max_tokens": 5, "ignore_eos": True},
    )
    assert status == 200, whole
    assert whole["choices"][0]["finish_reason"] == "length"
    assert whole["usage"]["completion_tokens"] == 5 and whole["usage"]["prompt_tokens"] > 0
    status, chunks = await asyncio.to_thread(
        post,
        f"{http_at}/v1/chat/completions",
        {
            "model": model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "ignore_eos": True,  # a random tiny model may sample EOS early
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert status == 200 and chunks[-1] == "[DONE]"
    events = [json.loads(c) for c in chunks[:-1]]
    assert events[-1]["usage"]["completion_tokens"] == 4
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    for bad, field, code in (
        ({"model": model, "prompt": "x", "n": 2}, "n", 400),
        ({"model": "other", "prompt": "x"}, "model", 404),
        ({"model": model, "prompt": "x", "temperature": "hot"}, "temperature", 400),
    ):
        status, error = await asyncio.to_thread(post, f"{http_at}/v1/completions", bad)
        assert (status, error["error"]["param"]) == (code, field), error

    async with insecure_channel(f"127.0.0.1:{pool.port}") as channel:
        stub = podpool_pb2_grpc.PodPoolServiceStub(channel)
        await stub.ReleasePod(podpool_pb2.ReleasePodRequest(pod_id=pod.pod_id, terminate=True))

    async def gone() -> bool:
        return (NAMESPACE, pod.pod_id) not in server.pods and (
            await records.pods(etcd).get(pod.pod_id)
        ) is None

    await eventually(gone, 60, "the released Pod and its registration to go")


async def test_a_restarted_podpool_adopts_its_pods_and_deletes_ended_ones(
    cluster: tuple[KubeApiServer, PodPool, EtcdStore],
) -> None:
    server, pool, etcd = cluster
    warm = await eventually(lambda: warm_kube_pods(server, etcd), 120, "a warm engine Pod")
    await pool.kill()  # no clean shutdown: the Pods stay, as after a crash
    # While it is away a Pod of its pool ends (its process exits with an error).
    labels = dict(server.pods[(NAMESPACE, warm[0].pod_id)]["metadata"]["labels"])
    labels["deepserve.io/pod-id"] = "pod-crashed"
    async with client.ApiClient(client.Configuration(host=server.url)) as api:
        await client.CoreV1Api(api).create_namespaced_pod(
            NAMESPACE,
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "pod-crashed", "labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {"name": "c", "image": "i", "command": ["python", "-c", "exit(3)"]}
                    ],
                },
            },
        )
    await eventually(
        lambda: _async(server.pods[(NAMESPACE, "pod-crashed")]["status"]["phase"] == "Failed"),
        30,
        "the crashed Pod to fail",
    )
    before = set(server.pods) - {(NAMESPACE, "pod-crashed")}
    await pool.start()
    await eventually(
        lambda: _async((NAMESPACE, "pod-crashed") not in server.pods),
        30,
        "the ended Pod's deletion",
    )
    # The warm Pod was adopted: still there, still registered, and no second one was made.
    await asyncio.sleep(3)
    assert set(server.pods) == before
    assert await records.pods(etcd).get(warm[0].pod_id) is not None


async def _async(value: T) -> T:
    return value


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # The pods inherit this process's environment (the kubelet's "image"): no cluster settings.
    for name in list(os.environ):
        if name.startswith("DEEPSERVE_FLOWSERVE_") or name.startswith("DEEPSERVE_PODPOOL_"):
            monkeypatch.delenv(name)
    yield


async def test_a_deployment_through_jobmgr_runs_on_engine_pods_and_is_routed(
    cluster: tuple[KubeApiServer, PodPool, EtcdStore], tiny_model: Path, tmp_path: Path
) -> None:
    """The platform's own path, unchanged: a serving job in jobmgr takes a Pod from the
    Kubernetes-backed pool, the Pod's instance registers, and the scheduler routes to it."""
    server, pool, etcd = cluster
    base = {
        **pool.env,
        "DEEPSERVE_JOBMGR_PODPOOL_ADDRESS": f"127.0.0.1:{pool.port}",
        "DEEPSERVE_JOBMGR_GRPC_PORT": str(free_port()),
        "DEEPSERVE_SCHEDULER_GRPC_PORT": str(free_port()),
    }
    jobmgr, scheduler = (
        ManagedProcess(name, [sys.executable, "-m", f"deepserve.{name}"], tmp_path / name, env=base)
        for name in ("jobmgr", "scheduler")
    )
    # Started from the main thread: their parent-death signal is tied to the forking thread.
    jobmgr.start()
    scheduler.start()
    jobmgr_at = f"127.0.0.1:{base['DEEPSERVE_JOBMGR_GRPC_PORT']}"
    scheduler_at = f"127.0.0.1:{base['DEEPSERVE_SCHEDULER_GRPC_PORT']}"
    job_id = f"kube-{free_port()}"
    try:
        for address in (jobmgr_at, scheduler_at):
            assert await wait_serving(address, 60), address
        async with insecure_channel(jobmgr_at) as channel:
            jobs = jobmgr_pb2_grpc.JobManagerServiceStub(channel)
            spec = jobmgr_pb2.JobSpec(
                kind=jobmgr_pb2.JOB_KIND_SERVING,
                serving=jobmgr_pb2.ServingSpec(model=str(tiny_model), replicas=1),
            )
            await jobs.CreateJob(jobmgr_pb2.CreateJobRequest(job_id=job_id, spec=spec))

            async def ready() -> bool:
                reply = await jobs.GetJob(jobmgr_pb2.GetJobRequest(job_id=job_id))
                return reply.job.status.ready_replicas == 1

            await eventually(ready, 180, "the job's replica")
            async with insecure_channel(scheduler_at) as sched:
                routed = await scheduler_pb2_grpc.SchedulerServiceStub(sched).Route(
                    scheduler_pb2.RouteRequest(
                        request_id="r-kube", model=str(tiny_model), prompt_tokens=4, max_tokens=4
                    )
                )
            (instance,) = routed.instances
            pods = {f"{p['status'].get('podIP')}:50060": n for (_, n), p in server.pods.items()}
            assert instance.address in pods  # an engine Pod, at its own Pod IP
            await jobs.DeleteJob(jobmgr_pb2.DeleteJobRequest(job_id=job_id))
        pod_id = pods[instance.address]

        async def released() -> bool:
            # Back in the warm pool, or its Pod deleted: either way no longer serving the job.
            found = await records.pods(etcd).get(pod_id)
            return found is None or found.record.state == PodState.WARM

        await eventually(released, 60, "the job's Pod to be released")
    finally:
        for process in (jobmgr, scheduler):
            await asyncio.to_thread(process.stop, 20.0)
