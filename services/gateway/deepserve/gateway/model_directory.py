"""Which models the platform serves: live instances (by etcd watch) plus registered models."""

from __future__ import annotations

from dataclasses import dataclass

from deepserve import records
from deepserve.errors import NotFound
from deepserve.records import InstanceRecord, ModelRecord
from deepserve.store.etcd import EtcdStore
from deepserve.store.informer import Informer


@dataclass(frozen=True, slots=True)
class ModelCard:
    """A model as the API lists it."""

    model_id: str
    owned_by: str
    created_at: float
    instances: int


class ModelDirectory:
    """Mirrors /deepserve/instances/ and /deepserve/models/ in memory."""

    def __init__(self, store: EtcdStore) -> None:
        self.instances: Informer[InstanceRecord] = Informer(records.instances(store))
        self.registered: Informer[ModelRecord] = Informer(records.models(store))

    def start(self) -> None:
        self.instances.start()
        self.registered.start()

    async def stop(self) -> None:
        await self.instances.stop()
        await self.registered.stop()

    def live_instances(self, model_id: str) -> list[InstanceRecord]:
        return [i for i in self.instances.items.values() if i.model == model_id]

    def list(self) -> list[ModelCard]:
        cards: dict[str, ModelCard] = {
            m.model_id: ModelCard(m.model_id, m.owned_by, m.created_at, 0)
            for m in self.registered.items.values()
        }
        for inst in self.instances.items.values():
            seen = cards.get(inst.model)
            if seen is None:
                cards[inst.model] = ModelCard(inst.model, "deepserve", inst.registered_at, 1)
            else:
                cards[inst.model] = ModelCard(
                    seen.model_id,
                    seen.owned_by,
                    min(seen.created_at, inst.registered_at),
                    seen.instances + 1,
                )
        return sorted(cards.values(), key=lambda c: c.model_id)

    def get(self, model_id: str) -> ModelCard:
        for card in self.list():
            if card.model_id == model_id:
                return card
        raise NotFound(f"The model '{model_id}' does not exist", field="model")
