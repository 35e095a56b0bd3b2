"""Settings of the Kubernetes pod backend, read from `DEEPSERVE_PODPOOL_KUBE_*` variables.

Only read when `DEEPSERVE_PODPOOL_BACKEND=kubernetes`. They describe the engine Pods podpool
makes (the pod template) and where it makes them (API server, namespace).
"""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict

# Labels every engine Pod carries: podpool finds its own Pods (watch, orphan reconcile) by them.
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "deepserve-podpool"
POOL_LABEL = "deepserve.io/pool"
POD_ID_LABEL = "deepserve.io/pod-id"
COMPONENT_LABEL = "app.kubernetes.io/component"


class KubeBackendSettings(BaseSettings):
    """The engine Pods' template and the API server podpool talks to."""

    model_config = SettingsConfigDict(env_prefix="DEEPSERVE_PODPOOL_KUBE_", extra="ignore")

    # API server URL; empty: the in-cluster service account, else ~/.kube/config.
    api_url: str = ""
    # Namespace of the engine Pods; empty: podpool's own (the service account's namespace).
    namespace: str = ""
    # Tells this pool's Pods apart from another pool's in the same namespace.
    pool_name: str = "deepserve"
    image: str = "deepserve/flowserve:0.2.0"
    image_pull_policy: str = "IfNotPresent"
    service_account: str = ""
    # Requests (and limits) of each engine Pod.
    cpu: str = "2"
    memory: str = "8Gi"
    # Accelerators per Pod, by their device plugin's resource name (nvidia.com/gpu,
    # huawei.com/Ascend910, ...); 0 makes CPU-only Pods.
    accelerator_resource: str = "nvidia.com/gpu"
    accelerators: int = 0
    # "key=value,key2=value2": nodes the engine Pods may run on.
    node_selector: str = ""
    # Tolerations as a JSON list of Kubernetes Toleration objects (e.g. for tainted GPU nodes).
    tolerations: str = "[]"
    # The node's weights cache (DRAM copies the node agent keeps), mounted at the same path in
    # every engine Pod; empty: no shared copies.
    weights_host_path: str = "/dev/shm/deepserve-weights"
    # A PersistentVolumeClaim holding the model files (DEEPSERVE_MODEL_CACHE in the Pods);
    # empty: the image's own cache directory.
    models_pvc: str = ""
    models_mount_path: str = "/models"
    # ConfigMap and Secret the engine Pods read their settings from (envFrom); empty: podpool
    # passes its own connection settings as plain variables (fine for tests, not for secrets).
    config_map: str = ""
    secret: str = ""
    # The Deployment that owns the engine Pods (ownerReferences): deleting it deletes them,
    # a restart of one podpool replica does not. Empty: no owner.
    owner_deployment: str = ""
    # Fixed ports inside each Pod (their own IP): the engine's gRPC and its /metrics.
    grpc_port: int = 50060
    metrics_port: int = 9400
    # The engine's OpenAI-compatible HTTP port (what an InferencePool targets); 0: none.
    http_port: int = 8000
    # Seconds a deleted Pod gets to drain before it is killed.
    termination_grace_s: int = 30
