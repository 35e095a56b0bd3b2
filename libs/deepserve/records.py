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


def _no_single_key(name: str) -> str:
    raise ValueError("the all-services view is read-only; pass a service name to write")
