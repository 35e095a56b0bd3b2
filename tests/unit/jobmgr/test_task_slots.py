"""A serving spec's desired shape as task slots."""

from __future__ import annotations

from deepserve.jobmgr.task_records import TaskSlot, desired_slots
from deepserve.jobs.records import ServingMode, ServingSpec
from deepserve.records import Role


def test_colocated_replicas_are_one_task_each() -> None:
    slots = desired_slots(ServingSpec(model="m", replicas=3))
    assert [s.name for s in slots] == ["r0-colocated0", "r1-colocated0", "r2-colocated0"]


def test_disaggregated_replicas_are_prefill_plus_decode_tasks() -> None:
    spec = ServingSpec(
        model="m",
        replicas=2,
        mode=ServingMode.DISAGGREGATED,
        prefill_instances=1,
        decode_instances=2,
    )
    slots = desired_slots(spec)
    assert [s.name for s in slots] == [
        "r0-prefill0",
        "r0-decode0",
        "r0-decode1",
        "r1-prefill0",
        "r1-decode0",
        "r1-decode1",
    ]
    assert TaskSlot(1, Role.DECODE, 1) in slots


def test_zero_replicas_want_nothing() -> None:
    assert desired_slots(ServingSpec(model="m", replicas=0)) == []
