"""deploy/kubernetes renders offline (tests/kustomize_render.py) and every object of every
overlay, and of the examples, is valid against the OpenAPI schemas of a pinned Kubernetes
version (kubernetes-validate). On top: the properties the deployment promises (one Deployment
per service with gRPC health probes, Services, PDBs, an HPA on the gateway, 2 jobmgr replicas,
namespace-scoped RBAC for podpool, secrets only by reference, Prometheus scraping), and the
ConfigMap's settings make a valid engine Pod of the right kind for each overlay."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from deepserve.config import CommonSettings
from deepserve.flowserve.settings import FlowServeSettings
from deepserve.gateway.settings import GatewaySettings
from deepserve.jobmgr.settings import JobMgrSettings
from deepserve.podpool.kube_pod_template import PodTemplate
from deepserve.podpool.kube_settings import KubeBackendSettings
from deepserve.podpool.node_agent import NodeAgentSettings
from deepserve.podpool.settings import PodPoolSettings
from deepserve.scheduler.settings import SchedulerSettings
from tests.kustomize_render import KustomizeError, load_documents, render

ROOT = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
OVERLAYS = ["cpu", "gpu", "npu", "external-stores"]
# The Kubernetes version the manifests target (and are validated against).
KUBE_VERSION = "1.33.0"
SERVICES = {"gateway": 50050, "scheduler": 50052, "jobmgr": 50051, "podpool": 50053}
# Kinds of the examples that come from CRDs (Gateway API, its inference extension): checked by
# the assertions below, not by Kubernetes' own schemas.
CRD_KINDS = {"InferencePool", "HTTPRoute", "Gateway"}

Obj = dict[str, Any]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Obj]]:
    return request.param, render(ROOT / "overlays" / request.param)


def of_kind(objects: list[Obj], kind: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def pod_spec(obj: Obj) -> Obj:
    return obj["spec"]["template"]["spec"]


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_every_object_is_valid_for_the_pinned_kubernetes(overlay: tuple[str, list[Obj]]) -> None:
    _, objects = overlay
    assert objects
    for obj in objects:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        assert obj["metadata"].get("namespace") == "deepserve", obj["metadata"]["name"]


def test_one_deployment_per_service_with_probes_service_and_pdb(
    overlay: tuple[str, list[Obj]],
) -> None:
    _, objects = overlay
    deployments = of_kind(objects, "Deployment")
    services, pdbs = of_kind(objects, "Service"), of_kind(objects, "PodDisruptionBudget")
    assert set(deployments) == {f"deepserve-{s}" for s in SERVICES}
    for service, grpc_port in SERVICES.items():
        deployment = deployments[f"deepserve-{service}"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
        (container,) = pod_spec(deployment)["containers"]
        assert container["command"] == ["python", "-m", f"deepserve.{service}"]
        assert container["livenessProbe"]["grpc"]["port"] == grpc_port
        assert "readinessProbe" in container
        ports = {p["containerPort"] for p in container["ports"]}
        assert grpc_port in ports
        svc = services[f"deepserve-{service}"]
        assert selects(svc["spec"]["selector"], labels)
        assert selects(pdbs[f"deepserve-{service}"]["spec"]["selector"]["matchLabels"], labels)
    assert deployments["deepserve-jobmgr"]["spec"]["replicas"] == 2
    assert deployments["deepserve-scheduler"]["spec"]["replicas"] >= 2
    # A PDB never blocks every eviction of a single-replica Deployment (podpool).
    assert pdbs["deepserve-podpool"]["spec"].get("maxUnavailable") == 1


def test_the_gateway_scales_on_a_horizontal_pod_autoscaler(
    overlay: tuple[str, list[Obj]],
) -> None:
    _, objects = overlay
    (hpa,) = of_kind(objects, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "deepserve-gateway",
    }
    gateway = of_kind(objects, "Deployment")["deepserve-gateway"]
    # Utilization targets need CPU requests on the scaled containers.
    assert pod_spec(gateway)["containers"][0]["resources"]["requests"]["cpu"]
    assert hpa["spec"]["minReplicas"] >= 2


def test_podpool_may_manage_pods_only_in_its_namespace(overlay: tuple[str, list[Obj]]) -> None:
    _, objects = overlay
    assert not of_kind(objects, "ClusterRole") and not of_kind(objects, "ClusterRoleBinding")
    (role,) = of_kind(objects, "Role").values()
    pods_rule = next(r for r in role["rules"] if "pods" in r["resources"])
    assert {"create", "delete", "watch", "list"} <= set(pods_rule["verbs"])
    assert all(set(r["resources"]) <= {"pods", "deployments"} for r in role["rules"])
    assert all(r["verbs"] == ["get"] for r in role["rules"] if "deployments" in r["resources"])
    (binding,) = of_kind(objects, "RoleBinding").values()
    assert binding["roleRef"]["kind"] == "Role"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "deepserve-podpool", "namespace": "deepserve"}
    ]
    accounts = {
        n: pod_spec(d).get("serviceAccountName") for n, d in of_kind(objects, "Deployment").items()
    }
    assert accounts.pop("deepserve-podpool") == "deepserve-podpool"
    assert set(accounts.values()) == {"deepserve"}  # no API rights, no token mounted
    assert of_kind(objects, "ServiceAccount")["deepserve"]["automountServiceAccountToken"] is False


def test_settings_come_from_the_configmap_and_secrets_by_reference(
    overlay: tuple[str, list[Obj]],
) -> None:
    name, objects = overlay
    configmap = of_kind(objects, "ConfigMap")["deepserve-config"]
    workloads = [*of_kind(objects, "Deployment").values(), *of_kind(objects, "DaemonSet").values()]
    for workload in workloads:
        for container in pod_spec(workload)["containers"]:
            assert {"configMapRef": {"name": "deepserve-config"}} in container["envFrom"]
            for var in container.get("env", []):
                if "REDIS" in var["name"] or "KEY" in var["name"]:
                    ref = var["valueFrom"]["secretKeyRef"]
                    assert ref == {"name": "deepserve-secrets", "key": var["name"]}
    assert not any("redis://" in str(v) for v in configmap["data"].values())
    secrets = of_kind(objects, "Secret")
    if name == "external-stores":
        assert not secrets and not of_kind(objects, "StatefulSet")  # the operator's own
        assert configmap["data"]["DEEPSERVE_ETCD_ENDPOINT"] == "etcd.example.internal:2379"
    else:
        assert "DEEPSERVE_REDIS_URL" in secrets["deepserve-secrets"]["stringData"]
        assert set(of_kind(objects, "StatefulSet")) == {"deepserve-etcd", "deepserve-valkey"}


def test_every_configmap_key_is_a_real_setting(overlay: tuple[str, list[Obj]]) -> None:
    _, objects = overlay
    known = {"DEEPSERVE_MODEL_CACHE"}  # the model catalog's cache directory
    for settings in (
        CommonSettings,
        GatewaySettings,
        SchedulerSettings,
        JobMgrSettings,
        PodPoolSettings,
        FlowServeSettings,
        KubeBackendSettings,
        NodeAgentSettings,
    ):
        prefix = settings.model_config.get("env_prefix", "")
        known |= {f"{prefix}{field}".upper() for field in settings.model_fields}
    data = of_kind(objects, "ConfigMap")["deepserve-config"]["data"]
    assert set(data) <= known, sorted(set(data) - known)


def test_prometheus_scrapes_every_service(overlay: tuple[str, list[Obj]]) -> None:
    _, objects = overlay
    for deployment in of_kind(objects, "Deployment").values():
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        container = pod_spec(deployment)["containers"][0]
        metrics = next(p for p in container["ports"] if p["name"] == "metrics")
        assert str(metrics["containerPort"]) == annotations["prometheus.io/port"]
        port_env = [v for v in container["env"] if v["name"].endswith("_METRICS_PORT")]
        assert port_env and port_env[0]["value"] == annotations["prometheus.io/port"]


def engine_pod(objects: list[Obj], monkeypatch: pytest.MonkeyPatch) -> Obj:
    """The engine Pod podpool would make from this overlay's ConfigMap."""
    for key, value in of_kind(objects, "ConfigMap")["deepserve-config"]["data"].items():
        monkeypatch.setenv(key, value)
    template = PodTemplate(PodPoolSettings(), KubeBackendSettings())  # type: ignore[call-arg]
    return template.manifest("pod-0123456789", namespace="deepserve")


@pytest.mark.parametrize(
    ("name", "resource", "device"),
    [
        ("cpu", None, "cpu"),
        ("external-stores", None, "cpu"),
        ("gpu", "nvidia.com/gpu", "cuda"),
        ("npu", "huawei.com/Ascend910", "npu"),
    ],
)
def test_the_engine_pods_fit_the_overlay(
    name: str, resource: str | None, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = render(ROOT / "overlays" / name)
    pod = engine_pod(objects, monkeypatch)
    kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)
    container = pod["spec"]["containers"][0]
    limits = container["resources"]["limits"]
    accelerators = {k: v for k, v in limits.items() if "/" in k}
    assert accelerators == ({resource: "1"} if resource else {})
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DEEPSERVE_FLOWSERVE_DEVICE"] == device
    # Settings and secrets reach the engine Pods by reference, never as copied values.
    assert container["envFrom"] == [
        {"configMapRef": {"name": "deepserve-config"}},
        {"secretRef": {"name": "deepserve-secrets"}},
    ]
    assert "DEEPSERVE_REDIS_URL" not in env
    if resource:
        assert pod["spec"]["nodeSelector"] and pod["spec"]["tolerations"][0]["key"] == resource
        agent = of_kind(objects, "DaemonSet")["deepserve-node-agent"]
        assert pod_spec(agent)["nodeSelector"] == pod["spec"]["nodeSelector"]
    # The node agent shares the node's weights cache with the engine Pods.
    agent = of_kind(objects, "DaemonSet")["deepserve-node-agent"]
    host_paths = {v["hostPath"]["path"] for v in pod_spec(agent)["volumes"] if "hostPath" in v}
    assert {v["hostPath"]["path"] for v in pod["spec"]["volumes"] if "hostPath" in v} == host_paths


def test_the_inference_pool_example_selects_engine_pods(monkeypatch: pytest.MonkeyPatch) -> None:
    example = ROOT / "examples" / "inference-pool.yaml"
    objects = load_documents(example)
    for obj in objects:
        if obj["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    (pool,) = [o for o in objects if o["kind"] == "InferencePool"]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    selector = pool["spec"]["selector"]["matchLabels"]
    # The engine Pods podpool makes carry the pool's labels; the model label follows the load.
    pod = engine_pod(render(ROOT / "overlays" / "cpu"), monkeypatch)
    labels = {**pod["metadata"]["labels"], "deepserve.io/model": selector["deepserve.io/model"]}
    assert selects(selector, labels)
    ports = {p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    assert {p["number"] for p in pool["spec"]["targetPorts"]} <= ports
    epp_ref = pool["spec"]["endpointPickerRef"]
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    assert epp_ref["port"]["number"] in {
        p["port"] for p in services[epp_ref["name"]]["spec"]["ports"]
    }
    (route,) = [o for o in objects if o["kind"] == "HTTPRoute"]
    backend = route["spec"]["rules"][0]["backendRefs"][0]
    assert (backend["kind"], backend["name"]) == ("InferencePool", pool["metadata"]["name"])


def test_the_validation_catches_a_broken_object() -> None:
    """The schema check means something: a misspelt field or a wrong type fails it."""
    deployment = of_kind(render(ROOT / "overlays" / "cpu"), "Deployment")["deepserve-gateway"]
    misspelt = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBE_VERSION, strict=True)
    wrong_type = {**deployment, "spec": {**deployment["spec"], "replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBE_VERSION, strict=True)


def test_the_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n")
    with pytest.raises(KustomizeError, match="commonLabels"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [cm.yaml]\npatches:\n  - path: p.yaml\n    target: {kind: ConfigMap, name: nope}\n"
    )
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n")
    (tmp_path / "p.yaml").write_text("- {op: add, path: /data, value: {}}\n")
    with pytest.raises(KustomizeError, match="matches no object"):
        render(tmp_path)
