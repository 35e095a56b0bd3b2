"""The etcd key space: every key the platform writes lives under one root prefix.

Keys are built here and nowhere else, so the layout is visible in one place:

    /deepserve/services/<service>/<process id>   live service processes (leased)
    /deepserve/pods/<pod id>                     pods of the pre-warmed pool (leased)
    /deepserve/instances/<instance id>           engines serving a model (leased)
    /deepserve/jobs/<job id>                     jobs: spec, status, events
    /deepserve/tasks/<job id>/<task id>          tasks of a job
    /deepserve/models/<model id>                 registered models
    /deepserve/apikeys/<sha256 of key>           API keys (hash only)
    /deepserve/tenants/<tenant>                  tenants and their limits
    /deepserve/files/<file id>                   uploaded files' metadata (content in the blob store)
    /deepserve/election/<name>                   leader-election candidates (leased)
    /deepserve/heatmaps/<model id>               PD-aware routing heatmaps (profiled per model)
    /deepserve/demand/<gateway>:<model id>       requests one gateway holds for a model at zero replicas
    /deepserve/kvprofiles/<model id>/<device>    KV capacity profiled once per (model, device)
    /deepserve/responses/<tenant>/<response id>  stored Responses API turns (leased: expiry)
    /deepserve/contexts/<tenant>/<context id>    explicit cached contexts (leased: their TTL)
    /deepserve/adapters/<tenant>%2F<adapter>     LoRA adapters registered against a base model
    /deepserve/nodeweights/<node>                weights copies a Kubernetes node holds (leased)
"""

from __future__ import annotations

from urllib.parse import quote, unquote

ROOT = "/deepserve/"


def _join(*parts: str) -> str:
    for part in parts:
        if not part:
            raise ValueError("empty key segment")
    # Quoting keeps names with '/' (e.g. org/model) one segment long.
    return ROOT + "/".join(quote(part, safe="") for part in parts)


class Keys:
    """Key builders; `*_prefix()` values end with '/' and are meant for range reads and watches."""

    @staticmethod
    def services_prefix(service: str | None = None) -> str:
        return _join("services", service) + "/" if service else ROOT + "services/"

    @staticmethod
    def service(service: str, process_id: str) -> str:
        return _join("services", service, process_id)

    @staticmethod
    def pods_prefix() -> str:
        return ROOT + "pods/"

    @staticmethod
    def pod(pod_id: str) -> str:
        return _join("pods", pod_id)

    @staticmethod
    def instances_prefix() -> str:
        return ROOT + "instances/"

    @staticmethod
    def instance(instance_id: str) -> str:
        return _join("instances", instance_id)

    @staticmethod
    def jobs_prefix() -> str:
        return ROOT + "jobs/"

    @staticmethod
    def job(job_id: str) -> str:
        return _join("jobs", job_id)

    @staticmethod
    def tasks_prefix(job_id: str | None = None) -> str:
        return _join("tasks", job_id) + "/" if job_id else ROOT + "tasks/"

    @staticmethod
    def task(job_id: str, task_id: str) -> str:
        return _join("tasks", job_id, task_id)

    @staticmethod
    def models_prefix() -> str:
        return ROOT + "models/"

    @staticmethod
    def model(model_id: str) -> str:
        return _join("models", model_id)

    @staticmethod
    def api_keys_prefix() -> str:
        return ROOT + "apikeys/"

    @staticmethod
    def api_key(key_hash: str) -> str:
        return _join("apikeys", key_hash)

    @staticmethod
    def tenants_prefix() -> str:
        return ROOT + "tenants/"

    @staticmethod
    def tenant(tenant: str) -> str:
        return _join("tenants", tenant)

    @staticmethod
    def election_prefix(name: str) -> str:
        return _join("election", name) + "/"

    @staticmethod
    def heatmaps_prefix() -> str:
        return ROOT + "heatmaps/"

    @staticmethod
    def heatmap(model_id: str) -> str:
        return _join("heatmaps", model_id)

    @staticmethod
    def demand_prefix() -> str:
        return ROOT + "demand/"

    @staticmethod
    def demand(entry: str) -> str:
        """One gateway's demand for one model; name it with `demand_entry` (one writer each)."""
        return _join("demand", entry)

    @staticmethod
    def demand_entry(source: str, model_id: str) -> str:
        return f"{source}:{model_id}"

    @staticmethod
    def responses_prefix(tenant: str | None = None) -> str:
        return _join("responses", tenant) + "/" if tenant else ROOT + "responses/"

    @staticmethod
    def response(tenant: str, response_id: str) -> str:
        return _join("responses", tenant, response_id)

    @staticmethod
    def contexts_prefix(tenant: str | None = None) -> str:
        return _join("contexts", tenant) + "/" if tenant else ROOT + "contexts/"

    @staticmethod
    def context(tenant: str, context_id: str) -> str:
        return _join("contexts", tenant, context_id)

    @staticmethod
    def adapters_prefix() -> str:
        return ROOT + "adapters/"

    @staticmethod
    def adapter(adapter_id: str) -> str:
        """`adapter_id` is "<tenant>/<name>", kept one segment: watchers key records by it."""
        return _join("adapters", adapter_id)

    @staticmethod
    def node_weights_prefix() -> str:
        return ROOT + "nodeweights/"

    @staticmethod
    def node_weights(node: str) -> str:
        return _join("nodeweights", node)

    @staticmethod
    def kv_profiles_prefix() -> str:
        return ROOT + "kvprofiles/"

    @staticmethod
    def kv_profile(model_id: str, device: str) -> str:
        return _join("kvprofiles", model_id, device)

    @staticmethod
    def files_prefix() -> str:
        return ROOT + "files/"

    @staticmethod
    def file(file_id: str) -> str:
        return _join("files", file_id)


def last_segment(key: str) -> str:
    return unquote(key.rsplit("/", 1)[-1])
