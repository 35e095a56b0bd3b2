"""Which models the platform serves: live instances (by etcd watch), registered models, and
each tenant's LoRA adapters (served on their base model's instances)."""

from __future__ import annotations

from dataclasses import dataclass

from deepserve import records
from deepserve.adapters.records import AdapterRecord, adapter_id, adapters
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
        # Keyed by adapter id ("<tenant>/<name>"): a tenant sees only its own.
        self.adapters: Informer[AdapterRecord] = Informer(adapters(store))

    def start(self) -> None:
        self.instances.start()
        self.registered.start()
        self.adapters.start()

    async def stop(self) -> None:
        await self.instances.stop()
        await self.registered.stop()
        await self.adapters.stop()

    def adapter_for(self, tenant: str, model: str) -> AdapterRecord | None:
        """The caller's adapter named `model`; another tenant's adapter is simply absent."""
        return self.adapters.items.get(adapter_id(tenant, model))

    def tenant_adapters(self, tenant: str) -> list[AdapterRecord]:
        return sorted(
            (a for a in self.adapters.items.values() if a.tenant == tenant), key=lambda a: a.name
        )

    def live_instances(self, model_id: str) -> list[InstanceRecord]:
        return [i for i in self.instances.items.values() if i.model == model_id]

    def list(self, tenant: str | None = None) -> list[ModelCard]:
        """Every served or registered model, plus `tenant`'s adapters (counted on the
        instances of their base)."""
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
        if tenant is not None:
            for adapter in self.tenant_adapters(tenant):
                base = cards.get(adapter.base_model)
                cards[adapter.name] = ModelCard(
                    adapter.name, adapter.tenant, adapter.created_at, base.instances if base else 0
                )
        return sorted(cards.values(), key=lambda c: c.model_id)

    def get(self, model_id: str, tenant: str | None = None) -> ModelCard:
        for card in self.list(tenant):
            if card.model_id == model_id:
                return card
        raise NotFound(f"The model '{model_id}' does not exist", field="model")
