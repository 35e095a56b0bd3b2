"""Records the services keep in etcd (JSON of these pydantic models), and their typed prefixes.

These are the platform's shared nouns: a live service process, a pod of the warm pool, an engine
instance serving a model, a registered model. Jobs and tasks belong to jobmgr (deepserve.jobmgr).
"""

from __future__ import annotations

import time
from enum import StrEnum

from pydantic import BaseModel, Field

from deepserve.store.etcd import EtcdStore, TypedPrefix
from deepserve.store.keys import Keys


class Role(StrEnum):
    """What part of inference an instance runs (the paper's TE modes)."""

    COLOCATED = "colocated"
    PREFILL = "prefill"
    DECODE = "decode"


class PodPurpose(StrEnum):
    """What a task claims a pod for: serving loads a model; training leaves the pod bare."""

    SERVING = "serving"
    TRAINING = "training"


class PodState(StrEnum):
    STARTING = "starting"
    WARM = "warm"
    ASSIGNED = "assigned"
    TERMINATING = "terminating"


class ServiceRecord(BaseModel):
    """A live service process (leased: gone when the process dies)."""

    service: str
    process_id: str
    address: str
    http_address: str = ""
    metrics_address: str = ""
    pid: int
    host: str
    started_at: float = Field(default_factory=time.time)


class PodRecord(BaseModel):
    """A pod: a process that can run one engine. Warm pods have started the runtime, no model."""

    pod_id: str
    state: PodState
    address: str
    host: str
    pid: int
    backend: str = "local"
    model: str = ""
    role: Role = Role.COLOCATED
    task_id: str = ""
    device: str = ""
    created_at: float = Field(default_factory=time.time)


class InstanceRecord(BaseModel):
    """An engine serving a model; the scheduler routes only to instances registered here."""

    instance_id: str
    model: str
    role: Role
    address: str
    pod_id: str
    job_id: str = ""
    task_id: str = ""
    tensor_parallel_size: int = 1
    device: str = "cpu"
    max_model_len: int = 0
    # Tokens per KV block of the engine's prefix cache: prompts are hashed into blocks of this
    # size to match what the instance caches (0: unknown, so no prefix can match it).
    block_size: int = 0
    registered_at: float = Field(default_factory=time.time)


class ModelRecord(BaseModel):
    """A model known to the platform (servable by name)."""

    model_id: str
    source: str = ""
    owned_by: str = "deepserve"
    created_at: float = Field(default_factory=time.time)


class NodeWeightsCopy(BaseModel):
    """One model's weights kept in a node's DRAM (prepared, ready to map)."""

    model: str
    tensor_parallel_size: int = 1
    nbytes: int = 0
    # Where the copy is on the node (engine Pods mount the node's cache at the same path).
    path: str = ""


class NodeWeightsRecord(BaseModel):
    """The weights copies one Kubernetes node holds; written only by that node's agent, on its
    lease (a dead agent's copies stop counting)."""

    node: str
    copies: list[NodeWeightsCopy] = Field(default_factory=list)
    updated_at: float = Field(default_factory=time.time)

    def holds(self, model: str, tp_size: int = 1) -> bool:
        return any(c.model == model and c.tensor_parallel_size == tp_size for c in self.copies)


def services(store: EtcdStore, service: str | None = None) -> TypedPrefix[ServiceRecord]:
    if service is None:
        return TypedPrefix(store, Keys.services_prefix(), ServiceRecord, _no_single_key)
    return TypedPrefix(
        store, Keys.services_prefix(service), ServiceRecord, lambda pid: Keys.service(service, pid)
    )


def pods(store: EtcdStore) -> TypedPrefix[PodRecord]:
    return TypedPrefix(store, Keys.pods_prefix(), PodRecord, Keys.pod)


def instances(store: EtcdStore) -> TypedPrefix[InstanceRecord]:
    return TypedPrefix(store, Keys.instances_prefix(), InstanceRecord, Keys.instance)


def models(store: EtcdStore) -> TypedPrefix[ModelRecord]:
    return TypedPrefix(store, Keys.models_prefix(), ModelRecord, Keys.model)


def node_weights(store: EtcdStore) -> TypedPrefix[NodeWeightsRecord]:
    return TypedPrefix(store, Keys.node_weights_prefix(), NodeWeightsRecord, Keys.node_weights)


def _no_single_key(name: str) -> str:
    raise ValueError("the all-services view is read-only; pass a service name to write")
