"""Tasks as stored in etcd: one engine instance of a serving job, placed on one pod.

A colocated replica is one task; a disaggregated replica is `prefill_instances` prefill tasks
plus `decode_instances` decode tasks. Each task fills a *slot* of the job's desired shape, so
a replacement task takes over its predecessor's slot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, Field

from deepserve.jobs.records import MAX_EVENTS, JobEvent, ServingMode, ServingSpec
from deepserve.records import Role
from deepserve.scaling.timeline import ScaleTimeline


class TaskState(StrEnum):
    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    FAILED = "failed"
    TERMINATING = "terminating"


@dataclass(frozen=True, slots=True, order=True)
class TaskSlot:
    """One unit of a job's desired shape: replica index, role, index within the role."""

    replica: int
    role: Role
    index: int = 0

    @property
    def name(self) -> str:
        return f"r{self.replica}-{self.role.value}{self.index}"


def desired_slots(spec: ServingSpec) -> list[TaskSlot]:
    """The slots a serving spec asks for, in a stable order."""
    slots: list[TaskSlot] = []
    for replica in range(spec.replicas):
        if spec.mode == ServingMode.COLOCATED:
            slots.append(TaskSlot(replica, Role.COLOCATED))
            continue
        slots.extend(TaskSlot(replica, Role.PREFILL, i) for i in range(spec.prefill_instances))
        slots.extend(TaskSlot(replica, Role.DECODE, i) for i in range(spec.decode_instances))
    return slots


class TaskRecord(BaseModel):
    """A task's placement and lifecycle, under /deepserve/tasks/<job id>/<task id>."""

    task_id: str
    job_id: str
    slot: str
    replica: int
    role: Role
    model: str
    tensor_parallel_size: int = 1
    state: TaskState = TaskState.PENDING
    pod_id: str = ""
    instance_id: str = ""
    address: str = ""
    cold_start: bool = False
    # The scale-up that placed it: the paper's five steps with their durations.
    scale_up: ScaleTimeline | None = None
    message: str = ""
    # The jobmgr replica (leader) that created it.
    created_by: str = ""
    events: list[JobEvent] = Field(default_factory=list)
    created_at: float = Field(default_factory=time.time)

    def record_event(self, reason: str, message: str = "") -> None:
        self.events.append(JobEvent(reason=reason, message=message))
        del self.events[:-MAX_EVENTS]
