"""TaskRecord -> protobuf for the JobManagerService edge (tasks are jobmgr's own records)."""

from __future__ import annotations

from deepserve.jobmgr.task_records import TaskRecord, TaskState
from deepserve.jobs.wire import event_to_proto
from deepserve.scaling.wire import steps_to_proto, weights_source_to_proto
from deepserve.store.etcd import Versioned
from deepserve.v1 import jobmgr_pb2 as pb
from deepserve.wire import role_to_proto

TASK_STATE_TO_PROTO = {
    TaskState.PENDING: pb.TASK_STATE_PENDING,
    TaskState.STARTING: pb.TASK_STATE_STARTING,
    TaskState.RUNNING: pb.TASK_STATE_RUNNING,
    TaskState.FAILED: pb.TASK_STATE_FAILED,
    TaskState.TERMINATING: pb.TASK_STATE_TERMINATING,
}


def task_to_proto(task: Versioned[TaskRecord]) -> pb.Task:
    r = task.record
    return pb.Task(
        task_id=r.task_id,
        job_id=r.job_id,
        slot=r.slot,
        role=role_to_proto(r.role),
        model=r.model,
        state=TASK_STATE_TO_PROTO[r.state],
        pod_id=r.pod_id,
        instance_id=r.instance_id,
        address=r.address,
        cold_start=r.cold_start,
        events=[event_to_proto(e) for e in r.events],
        created_at_unix=r.created_at,
        message=r.message,
        revision=task.mod_revision,
        scale_steps=steps_to_proto(r.scale_up) if r.scale_up else [],
        weights_source=weights_source_to_proto(r.scale_up.weights_source) if r.scale_up else 0,
    )
