"""The Kubernetes pod backend against a stand-in API server speaking the real REST and watch
protocol, through the real kubernetes_asyncio client: Pods from the template (resources,
accelerators, node selector, tolerations, weights volume, labels, owner references), followed
by watch, deleted on release, ended Pods cleaned up, orphans reconciled after a restart."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import kubernetes_validate
import pytest
import pytest_asyncio
from kubernetes_asyncio import client

from deepserve.errors import InvalidArgument
from deepserve.podpool.kube_pod_watch import KubePodWatch
from deepserve.podpool.kube_settings import KubeBackendSettings
from deepserve.podpool.kubernetes_backend import KubernetesBackend
from deepserve.podpool.settings import PodPoolSettings
from deepserve.records import PodRecord, PodState
from tests.kube_apiserver import KubeApiServer, Node, kube_apiserver

pytestmark = pytest.mark.timeout(60)

NAMESPACE = "serving"
# The Kubernetes version whose OpenAPI schemas the Pods are validated against.
KUBE_VERSION = "1.33.0"


@pytest_asyncio.fixture
async def server() -> AsyncIterator[KubeApiServer]:
    nodes = [Node("gpu-1", {"accelerator": "h100"}), Node("gpu-2", {"accelerator": "h100"})]
    async with kube_apiserver(nodes=nodes) as api:
        api.add_deployment(NAMESPACE, "deepserve-podpool")
        yield api


def kube_settings(server: KubeApiServer, **changes: Any) -> KubeBackendSettings:
    base: dict[str, Any] = {
        "api_url": server.url,
        "namespace": NAMESPACE,
        "pool_name": "test-pool",
        "image": "registry.example/deepserve/flowserve:0.2.0",
        "owner_deployment": "deepserve-podpool",
        "accelerator_resource": "nvidia.com/gpu",
        "accelerators": 1,
        "node_selector": "accelerator=h100",
        "tolerations": '[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]',
        "models_pvc": "deepserve-models",
    }
    return KubeBackendSettings(**{**base, **changes})  # type: ignore[arg-type]


@pytest_asyncio.fixture
async def make_backend(
    server: KubeApiServer,
) -> AsyncIterator[Callable[..., Any]]:
    made: list[KubernetesBackend] = []

    async def make(
        registered: Callable[[str], bool] = lambda _: False, **changes: Any
    ) -> KubernetesBackend:
        ended: list[str] = []

        async def on_ended(pod_id: str) -> None:
            ended.append(pod_id)

        backend = KubernetesBackend(
            PodPoolSettings(pod_start_timeout_s=60),  # type: ignore[call-arg]
            kube_settings(server, **changes),
            on_pod_ended=on_ended,
        )
        backend.ended_calls = ended  # type: ignore[attr-defined]
        await backend.start(registered)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.close()


def record(pod_id: str) -> PodRecord:
    return PodRecord(pod_id=pod_id, state=PodState.WARM, address="", host="", pid=0)


async def running(backend: KubernetesBackend, pod_id: str) -> None:
    assert backend.watch is not None
    ok = await backend.watch.wait_for(
        lambda pods: pod_id in pods and pods[pod_id].phase == "Running", 10
    )
    assert ok, backend.watch.pods.get(pod_id)


async def test_a_warm_pod_is_a_pod_made_from_the_template(
    server: KubeApiServer, make_backend: Callable[..., Any]
) -> None:
    backend = await make_backend()
    await backend.create_pod("pod-0123456789")
    await running(backend, "pod-0123456789")
    pod = server.pods[(NAMESPACE, "pod-0123456789")]
    # What was POSTed is a valid Pod of the pinned Kubernetes version.
    kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)
    labels = pod["metadata"]["labels"]
    assert labels["app.kubernetes.io/managed-by"] == "deepserve-podpool"
    assert labels["deepserve.io/pool"] == "test-pool"
    owner = pod["metadata"]["ownerReferences"][0]
    deployment = server.deployments[(NAMESPACE, "deepserve-podpool")]
    assert (owner["kind"], owner["name"], owner["uid"]) == (
        "Deployment",
        "deepserve-podpool",
        deployment["metadata"]["uid"],
    )
    container = pod["spec"]["containers"][0]
    assert container["image"] == "registry.example/deepserve/flowserve:0.2.0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert pod["spec"]["nodeSelector"] == {"accelerator": "h100"}
    assert pod["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["weights-cache"]["hostPath"]["path"] == "/dev/shm/deepserve-weights"
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "deepserve-models"
    env = {e["name"]: e for e in container["env"]}
    assert env["DEEPSERVE_FLOWSERVE_POD_ID"]["value"] == "pod-0123456789"
    assert env["DEEPSERVE_FLOWSERVE_BACKEND"]["value"] == "kubernetes"
    assert env["DEEPSERVE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert backend.node_of("pod-0123456789") in {"gpu-1", "gpu-2"}
    assert backend.is_starting("pod-0123456789") and backend.started_here("pod-0123456789")


async def test_an_npu_pool_asks_for_ascend_devices(
    server: KubeApiServer, make_backend: Callable[..., Any]
) -> None:
    backend = await make_backend(accelerator_resource="huawei.com/Ascend910", accelerators=2)
    await backend.create_pod("pod-npu")
    limits = server.pods[(NAMESPACE, "pod-npu")]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["huawei.com/Ascend910"] == "2" and "nvidia.com/gpu" not in limits
    kubernetes_validate.validate(server.pods[(NAMESPACE, "pod-npu")], KUBE_VERSION, strict=True)


async def test_pods_are_followed_by_watch_not_by_polling(
    server: KubeApiServer, make_backend: Callable[..., Any]
) -> None:
    backend = await make_backend()
    for i in range(3):
        await backend.create_pod(f"pod-w{i}")
    for i in range(3):
        await running(backend, f"pod-w{i}")
    await asyncio.sleep(0.5)
    lists = [p for m, p in server.requests if m == "GET" and p.endswith("/pods")]
    # One list at start, then one long watch request (the rest arrives as events on it).
    assert len(lists) == 2, server.requests
    server.set_phase(NAMESPACE, "pod-w1", "Failed")
    assert await backend.watch.wait_for(lambda pods: "pod-w1" not in pods, 10)
    assert backend.reap() == ["pod-w1"]
    assert backend.ended_calls == ["pod-w1"]  # its etcd registration is dropped at once
    assert not backend.is_starting("pod-w1")


async def test_release_deletes_the_pod(
    server: KubeApiServer, make_backend: Callable[..., Any]
) -> None:
    backend = await make_backend()
    await backend.create_pod("pod-del")
    await running(backend, "pod-del")
    await backend.delete_pod(record("pod-del"))
    assert await backend.watch.wait_for(lambda pods: "pod-del" not in pods, 10)
    assert (NAMESPACE, "pod-del") not in server.pods
    assert not backend.started_here("pod-del")
    # Deleting a Pod that is gone already is not an error.
    await backend.delete_pod(record("pod-del"))


async def test_orphans_are_reconciled_after_a_restart(
    server: KubeApiServer, make_backend: Callable[..., Any]
) -> None:
    first = await make_backend()
    for name in ("pod-registered", "pod-starting", "pod-stale", "pod-failed"):
        await first.create_pod(name)
        await running(first, name)
    await first.close()  # podpool goes away; its Pods stay
    assert len(server.pods) == 4
    server.pods[(NAMESPACE, "pod-stale")]["metadata"]["creationTimestamp"] = "2020-01-01T00:00:00Z"
    server.set_phase(NAMESPACE, "pod-failed", "Failed")
    # Another pool's Pod in the same namespace is not ours to touch.
    other = await make_backend(pool_name="other-pool")
    await other.create_pod("pod-other")

    second = await make_backend(registered=lambda pod_id: pod_id == "pod-registered")
    assert second.started_here("pod-registered")  # registered in etcd: adopted
    assert second.started_here("pod-starting")  # young, not registered yet: adopted
    assert not second.started_here("pod-stale")  # never registered: deleted
    assert not second.started_here("pod-other")
    assert await second.watch.wait_for(
        lambda pods: "pod-stale" not in pods and "pod-failed" not in pods, 10
    )
    assert set(server.pods) == {
        (NAMESPACE, "pod-registered"),
        (NAMESPACE, "pod-starting"),
        (NAMESPACE, "pod-other"),
    }


async def test_a_cold_start_prefers_the_nodes_holding_the_weights(
    server: KubeApiServer, make_backend: Callable[..., Any]
) -> None:
    backend = await make_backend()
    # Fill gpu-2 first so the least-loaded choice alone would pick gpu-1.
    backend.prefer_nodes("pod-p0", ["gpu-2"])
    await backend.create_pod("pod-p0")
    backend.prefer_nodes("pod-p1", ["gpu-2"])
    await backend.create_pod("pod-p1")
    await running(backend, "pod-p1")
    assert backend.node_of("pod-p0") == backend.node_of("pod-p1") == "gpu-2"
    affinity = server.pods[(NAMESPACE, "pod-p1")]["spec"]["affinity"]["nodeAffinity"]
    terms = affinity["preferredDuringSchedulingIgnoredDuringExecution"]
    assert terms[0]["preference"]["matchFields"][0]["values"] == ["gpu-2"]


async def test_the_watch_lists_again_after_410_gone(server: KubeApiServer) -> None:
    async with client.ApiClient(client.Configuration(host=server.url)) as api:
        watch = KubePodWatch(client.CoreV1Api(api), NAMESPACE, "app=x", watch_timeout_s=1)
        watch.start()
        try:
            await asyncio.wait_for(watch.ready.wait(), 10)
            server.compact()  # the watch's version is now too old: its next watch gets 410
            await asyncio.sleep(1.5)
            await client.CoreV1Api(api).create_namespaced_pod(
                NAMESPACE,
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": "late", "labels": {"app": "x"}},
                    "spec": {"containers": [{"name": "c", "image": "i"}]},
                },
            )
            assert await watch.wait_for(lambda pods: "late" in pods, 10)
        finally:
            await watch.stop()


async def test_bad_template_settings_name_the_field(server: KubeApiServer) -> None:
    with pytest.raises(InvalidArgument) as bad:
        KubernetesBackend(PodPoolSettings(), kube_settings(server, node_selector="gpu"))  # type: ignore[call-arg]
    assert bad.value.field == "kube_node_selector"
    with pytest.raises(InvalidArgument) as bad:
        KubernetesBackend(PodPoolSettings(), kube_settings(server, tolerations="{oops"))  # type: ignore[call-arg]
    assert bad.value.field == "kube_tolerations"
