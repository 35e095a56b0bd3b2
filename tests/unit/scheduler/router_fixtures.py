"""Routers over in-memory state (no etcd, no Redis) for the routing unit tests and the bench."""

from __future__ import annotations

from deepserve.jobs.records import RoutingPolicy
from deepserve.records import InstanceRecord, Role
from deepserve.scheduler.decode_predictor import DecodeLengthPredictor
from deepserve.scheduler.heatmap_table import HeatmapTable
from deepserve.scheduler.instance_table import RoleGroups
from deepserve.scheduler.load_tracker import InstanceLoad, LoadTracker
from deepserve.scheduler.policy_table import PolicyTable
from deepserve.scheduler.prefix_index import PrefixIndex
from deepserve.scheduler.router import Router, RoutingConfig

MODEL = "m"
# Tokens per KV block of the fixtures' instances (and of the hashes the tests route with).
BLOCK = 16


class StaticTable:
    """An InstanceSource over a fixed list."""

    def __init__(self, instances: list[InstanceRecord]) -> None:
        self.instances = instances

    def groups(self, model: str) -> RoleGroups:
        return RoleGroups.of(i for i in self.instances if i.model == model)


def instance(
    instance_id: str, role: Role = Role.COLOCATED, model: str = MODEL, block_size: int = BLOCK
) -> InstanceRecord:
    return InstanceRecord(
        instance_id=instance_id,
        model=model,
        role=role,
        address="x:1",
        pod_id="p",
        block_size=block_size,
    )


def make_router(
    instances: list[InstanceRecord],
    *,
    loads: dict[str, int] | None = None,
    policy: RoutingPolicy = RoutingPolicy.DEEPSERVE,
    config: RoutingConfig | None = None,
) -> Router:
    table = StaticTable(instances)
    tracker = LoadTracker(None, lambda: [i.instance_id for i in table.instances])
    tracker.set_loads({k: InstanceLoad(waiting=v) for k, v in (loads or {}).items()})
    return Router(
        table,
        tracker,
        PrefixIndex(),
        DecodeLengthPredictor(),
        HeatmapTable(None),
        PolicyTable(None, policy),
        config,
    )
