"""The scheduler's in-memory table of live instances, pushed by an etcd watch (never polled)."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from deepserve import records
from deepserve.records import InstanceRecord, Role
from deepserve.store.etcd import EtcdStore
from deepserve.store.informer import Informer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RoleGroups:
    """A model's live instances split into the paper's TE groups, each sorted by id."""

    colocated: tuple[InstanceRecord, ...] = ()
    prefill: tuple[InstanceRecord, ...] = ()
    decode: tuple[InstanceRecord, ...] = ()

    @classmethod
    def of(cls, instances: Iterable[InstanceRecord]) -> RoleGroups:
        ordered = sorted(instances, key=lambda r: r.instance_id)
        return cls(
            tuple(i for i in ordered if i.role == Role.COLOCATED),
            tuple(i for i in ordered if i.role == Role.PREFILL),
            tuple(i for i in ordered if i.role == Role.DECODE),
        )

    def __bool__(self) -> bool:
        return bool(self.colocated or self.prefill or self.decode)

    def without(self, excluded: set[str]) -> RoleGroups:
        def keep(group: tuple[InstanceRecord, ...]) -> tuple[InstanceRecord, ...]:
            return tuple(i for i in group if i.instance_id not in excluded)

        return RoleGroups(keep(self.colocated), keep(self.prefill), keep(self.decode))


class InstanceTable:
    """Live instances by id and by model; counts the additions and removals it has seen."""

    def __init__(self, store: EtcdStore) -> None:
        self._informer = Informer(records.instances(store))
        self._informer.add_handler(self._on_change)
        self.by_model: dict[str, dict[str, InstanceRecord]] = defaultdict(dict)
        self.added = 0
        self.removed = 0
        # Routing asks for a model's groups on every request; they change only on watch events.
        self._groups: dict[str, RoleGroups] = {}

    @property
    def ready(self) -> bool:
        return self._informer.ready.is_set()

    def start(self) -> None:
        self._informer.start()

    async def stop(self) -> None:
        await self._informer.stop()

    def get(self, instance_id: str) -> InstanceRecord | None:
        return self._informer.items.get(instance_id)

    def all(self) -> list[InstanceRecord]:
        return sorted(self._informer.items.values(), key=lambda r: r.instance_id)

    def of_model(self, model: str) -> list[InstanceRecord]:
        return sorted(self.by_model.get(model, {}).values(), key=lambda r: r.instance_id)

    def groups(self, model: str) -> RoleGroups:
        found = self._groups.get(model)
        if found is None:
            found = self._groups[model] = RoleGroups.of(self.by_model.get(model, {}).values())
        return found

    def _on_change(self, kind: str, instance_id: str, record: InstanceRecord | None) -> None:
        self._groups.clear()
        if kind == "put" and record is not None:
            for model, group in self.by_model.items():  # a re-registration may change model
                if model != record.model:
                    group.pop(instance_id, None)
            is_new = instance_id not in self.by_model[record.model]
            self.by_model[record.model][instance_id] = record
            if is_new:
                self.added += 1
                log.info(
                    "instance added",
                    extra={"fields": {"instance_id": instance_id, "model": record.model}},
                )
        else:
            for group in self.by_model.values():
                if group.pop(instance_id, None) is not None:
                    self.removed += 1
                    log.info("instance removed", extra={"fields": {"instance_id": instance_id}})
