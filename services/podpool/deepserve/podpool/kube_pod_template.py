"""The engine Pod a warm pod becomes on Kubernetes: one FlowServe shell, no model yet.

Built as a plain manifest (dict), exactly what is POSTed to the API server, so tests validate it
against the Kubernetes schemas. The Pod learns its address through the downward API (its IP
becomes DEEPSERVE_HOST) and registers in etcd as every pod does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from deepserve.errors import InvalidArgument
from deepserve.podpool.kube_settings import (
    COMPONENT_LABEL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    POD_ID_LABEL,
    POOL_LABEL,
    KubeBackendSettings,
)
from deepserve.podpool.settings import PodPoolSettings

# The backend's name, which its pods put in their PodRecord.
KUBERNETES_BACKEND = "kubernetes"

WEIGHTS_VOLUME = "weights-cache"
MODELS_VOLUME = "models"


@dataclass(frozen=True, slots=True)
class OwnerRef:
    """The object whose deletion garbage-collects the engine Pods (podpool's Deployment)."""

    api_version: str
    kind: str
    name: str
    uid: str

    def to_manifest(self) -> dict[str, Any]:
        return {
            "apiVersion": self.api_version,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            # The Deployment outlives its Pods' owner; it does not wait on them to be deleted.
            "blockOwnerDeletion": False,
            "controller": False,
        }


def pool_labels(kube: KubeBackendSettings) -> dict[str, str]:
    return {MANAGED_BY_LABEL: MANAGED_BY, POOL_LABEL: kube.pool_name}


def pool_selector(kube: KubeBackendSettings) -> str:
    """The label selector of every Pod of this pool."""
    return ",".join(f"{k}={v}" for k, v in sorted(pool_labels(kube).items()))


def parse_node_selector(text: str) -> dict[str, str]:
    selector: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise InvalidArgument(
                f"node selector entry {part!r} is not key=value", field="kube_node_selector"
            )
        selector[key.strip()] = value.strip()
    return selector


def parse_tolerations(text: str) -> list[dict[str, Any]]:
    try:
        tolerations = json.loads(text or "[]")
    except json.JSONDecodeError as exc:
        raise InvalidArgument(
            f"tolerations are not JSON: {exc}", field="kube_tolerations"
        ) from None
    if not isinstance(tolerations, list) or not all(isinstance(t, dict) for t in tolerations):
        raise InvalidArgument(
            "tolerations must be a JSON list of objects", field="kube_tolerations"
        )
    return tolerations


class PodTemplate:
    """Makes engine Pod manifests from the pool's settings."""

    def __init__(self, pool: PodPoolSettings, kube: KubeBackendSettings) -> None:
        self.pool = pool
        self.kube = kube
        # Parsed once: a bad setting fails podpool's start, not every scale-up.
        self.node_selector = parse_node_selector(kube.node_selector)
        self.tolerations = parse_tolerations(kube.tolerations)

    def resources(self) -> dict[str, Any]:
        requests: dict[str, str] = {"cpu": self.kube.cpu, "memory": self.kube.memory}
        limits: dict[str, str] = {"memory": self.kube.memory}
        if self.kube.accelerators > 0:
            # Extended resources (device plugins) must have request == limit.
            count = str(self.kube.accelerators)
            requests[self.kube.accelerator_resource] = count
            limits[self.kube.accelerator_resource] = count
        return {"requests": requests, "limits": limits}

    def env(self, pod_id: str) -> list[dict[str, Any]]:
        common = self.pool.common
        env: list[dict[str, Any]] = [
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            # The Pod listens on, and advertises, its own IP.
            {"name": "DEEPSERVE_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "DEEPSERVE_FLOWSERVE_POD_ID", "value": pod_id},
            # Its PodRecord says which backend owns it (the local backend reads only its own).
            {"name": "DEEPSERVE_FLOWSERVE_BACKEND", "value": KUBERNETES_BACKEND},
            {"name": "DEEPSERVE_FLOWSERVE_GRPC_PORT", "value": str(self.kube.grpc_port)},
            {"name": "DEEPSERVE_FLOWSERVE_METRICS_PORT", "value": str(self.kube.metrics_port)},
            {"name": "DEEPSERVE_FLOWSERVE_MODEL", "value": ""},
            {"name": "DEEPSERVE_FLOWSERVE_HTTP_PORT", "value": str(self.kube.http_port)},
        ]  # fmt: skip
        if not self.kube.config_map:
            env += [
                {"name": "DEEPSERVE_ETCD_ENDPOINT", "value": common.etcd_endpoint},
                {"name": "DEEPSERVE_LEASE_TTL_S", "value": str(common.lease_ttl_s)},
                {"name": "DEEPSERVE_LOG_LEVEL", "value": common.log_level},
            ]
        if not self.kube.secret:
            env.append({"name": "DEEPSERVE_REDIS_URL", "value": common.redis_url})
        if self.pool.pod_device:
            env.append({"name": "DEEPSERVE_FLOWSERVE_DEVICE", "value": self.pool.pod_device})
        if self.kube.weights_host_path:
            env.append(
                {
                    "name": "DEEPSERVE_FLOWSERVE_WEIGHTS_CACHE_DIR",
                    "value": self.kube.weights_host_path,
                }
            )
        else:
            env.append({"name": "DEEPSERVE_FLOWSERVE_USE_WEIGHTS_CACHE", "value": "false"})
        if self.kube.models_pvc:
            env.append({"name": "DEEPSERVE_MODEL_CACHE", "value": self.kube.models_mount_path})
        if self.pool.pod_threads > 0:
            env.append({"name": "DEEPSERVE_FLOWSERVE_THREADS", "value": str(self.pool.pod_threads)})
        return env

    def env_from(self) -> list[dict[str, Any]]:
        sources: list[dict[str, Any]] = []
        if self.kube.config_map:
            sources.append({"configMapRef": {"name": self.kube.config_map}})
        if self.kube.secret:
            sources.append({"secretRef": {"name": self.kube.secret}})
        return sources

    def volumes(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        volumes: list[dict[str, Any]] = []
        mounts: list[dict[str, Any]] = []
        if self.kube.weights_host_path:
            # The node agent's copies: same node, same directory, so Pods map them.
            volumes.append(
                {
                    "name": WEIGHTS_VOLUME,
                    "hostPath": {"path": self.kube.weights_host_path, "type": "DirectoryOrCreate"},
                }
            )
            mounts.append({"name": WEIGHTS_VOLUME, "mountPath": self.kube.weights_host_path})
        if self.kube.models_pvc:
            volumes.append(
                {
                    "name": MODELS_VOLUME,
                    "persistentVolumeClaim": {"claimName": self.kube.models_pvc, "readOnly": True},
                }
            )
            mounts.append(
                {"name": MODELS_VOLUME, "mountPath": self.kube.models_mount_path, "readOnly": True}
            )
        return volumes, mounts

    def manifest(
        self,
        pod_id: str,
        *,
        namespace: str,
        owner: OwnerRef | None = None,
        preferred_nodes: list[str] | None = None,
    ) -> dict[str, Any]:
        """The Pod for `pod_id`; `preferred_nodes` (nodes holding the weights the Pod will load)
        become a preferred node affinity: the scheduler places it there when it can."""
        volumes, mounts = self.volumes()
        container: dict[str, Any] = {
            "name": "flowserve",
            "image": self.kube.image,
            "imagePullPolicy": self.kube.image_pull_policy,
            "command": ["python", "-m", "deepserve.flowserve"],
            "env": self.env(pod_id),
            "resources": self.resources(),
            "ports": [
                {"name": "grpc", "containerPort": self.kube.grpc_port, "protocol": "TCP"},
                {"name": "metrics", "containerPort": self.kube.metrics_port, "protocol": "TCP"},
            ]
            + (
                [{"name": "http", "containerPort": self.kube.http_port, "protocol": "TCP"}]
                if self.kube.http_port > 0
                else []
            ),
            # Ready once the shell serves (warm); podpool itself waits for the etcd record.
            "readinessProbe": {
                "grpc": {"port": self.kube.grpc_port},
                "periodSeconds": 5,
            },
            "volumeMounts": mounts,
        }
        if env_from := self.env_from():
            container["envFrom"] = env_from
        spec: dict[str, Any] = {
            # podpool replaces dead pods itself (a new id, a new registration).
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": self.kube.termination_grace_s,
            "containers": [container],
            "volumes": volumes,
        }
        if self.node_selector:
            spec["nodeSelector"] = dict(self.node_selector)
        if self.tolerations:
            spec["tolerations"] = [dict(t) for t in self.tolerations]
        if self.kube.service_account:
            spec["serviceAccountName"] = self.kube.service_account
        if preferred_nodes:
            spec["affinity"] = {
                "nodeAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "weight": 100,
                            "preference": {
                                "matchFields": [
                                    {
                                        "key": "metadata.name",
                                        "operator": "In",
                                        "values": sorted(preferred_nodes),
                                    }
                                ]
                            },
                        }
                    ]
                }
            }
        metadata: dict[str, Any] = {
            "name": pod_id,
            "namespace": namespace,
            "labels": {
                **pool_labels(self.kube),
                POD_ID_LABEL: pod_id,
                COMPONENT_LABEL: "engine",
            },
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(self.kube.metrics_port),
                "prometheus.io/path": "/metrics",
            },
        }
        if owner is not None:
            metadata["ownerReferences"] = [owner.to_manifest()]
        return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}
