"""The adapter records' one writer: registration checks an adapter against its base model.

An adapter is refused here, with the reason and the faulty field, when its name or base is
missing, its base model is unknown, its rank is over DEEPSERVE_LORA_MAX_RANK, its tensors do
not fit the base, or its files are malformed. Registered adapters are visible to their tenant
only; gateways mirror the records to resolve a request's model.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from deepserve.adapters.peft_format import AdapterSpec, BaseShape, inspect_adapter
from deepserve.adapters.records import AdapterRecord, adapter_id, adapters
from deepserve.errors import AlreadyExists, Conflict, InvalidArgument, NotFound
from deepserve.models.catalog import resolve_model
from deepserve.store.etcd import EtcdStore

# Letters, digits, '.', '_', ':' and '-' (fine-tuned names are ft:BASE:SUFFIX:ID).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,199}")


class AdapterRegistry:
    """Register (checked), delete and list LoRA adapters in etcd."""

    def __init__(self, store: EtcdStore, *, model_cache_dir: Path, max_rank: int) -> None:
        self._records = adapters(store)
        self._cache_dir = model_cache_dir
        self._max_rank = max_rank

    async def register(self, record: AdapterRecord, *, replace: bool = False) -> AdapterRecord:
        for field in ("name", "tenant", "base_model", "path"):
            if not getattr(record, field):
                raise InvalidArgument(f"{field} is required", field=field)
        if not _NAME.fullmatch(record.name):
            raise InvalidArgument(
                "an adapter name is up to 200 letters, digits, '.', '_', ':' or '-'",
                field="name",
            )
        try:
            base_dir = resolve_model(record.base_model, self._cache_dir)
        except NotFound as exc:
            raise InvalidArgument(exc.message, field="base_model") from exc
        spec = await asyncio.to_thread(self._inspect, record.path, base_dir)
        checked = record.model_copy(update={"rank": spec.rank})
        if replace:
            await self._records.put(checked.adapter_id, checked)
            return checked
        try:
            await self._records.create(checked.adapter_id, checked)
        except Conflict as exc:
            raise AlreadyExists(f"adapter {record.name!r} already exists", field="name") from exc
        return checked

    def _inspect(self, path: str, base_dir: Path) -> AdapterSpec:
        if not Path(path).is_dir():
            raise InvalidArgument(f"{path} is not a directory", field="path")
        try:
            base = BaseShape.from_config_json(base_dir)
        except (OSError, ValueError, KeyError) as exc:
            raise InvalidArgument(
                f"the base model's config is unreadable: {exc}", field="base_model"
            ) from exc
        return inspect_adapter(path, base, self._max_rank)

    async def delete(self, tenant: str, name: str) -> AdapterRecord:
        found = await self._records.get(adapter_id(tenant, name))
        if found is None:
            raise NotFound(f"adapter {name!r} not found", field="name")
        await self._records.delete(adapter_id(tenant, name))
        return found.record

    async def list(self, tenant: str = "") -> list[AdapterRecord]:
        found, _ = await self._records.list()
        return sorted(
            (v.record for v in found if not tenant or v.record.tenant == tenant),
            key=lambda r: (r.tenant, r.name),
        )
