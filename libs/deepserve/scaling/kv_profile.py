"""KV cache capacity profiled once per (model, device) and kept in etcd (scale-up step 4).

The first instance of a model on a kind of device sizes its KV cache and stores the result;
every later instance reads it instead of profiling again.
"""

from __future__ import annotations

import time

from pydantic import BaseModel, Field

from deepserve.store.etcd import EtcdStore, TypedPrefix
from deepserve.store.keys import Keys


class KVProfile(BaseModel):
    """How many KV blocks an instance of `model` gets on `device` at `tp_size`."""

    model: str
    device: str
    tp_size: int = 1
    block_size: int
    num_blocks: int
    dtype: str
    # The memory budget it was profiled for; a different budget profiles again.
    memory_mb: int = 0
    profiled_at: float = Field(default_factory=time.time)


class KVProfileStore:
    """Reads and writes KV profiles under /deepserve/kvprofiles/<model>/<device>."""

    def __init__(self, store: EtcdStore) -> None:
        self._store = store

    @staticmethod
    def _device_key(device: str, tp_size: int, block_size: int) -> str:
        return f"{device}-tp{tp_size}-b{block_size}"

    def _prefix(self, model: str) -> TypedPrefix[KVProfile]:
        return TypedPrefix(
            self._store,
            Keys.kv_profile(model, "x")[: -len("x")],
            KVProfile,
            lambda device: Keys.kv_profile(model, device),
        )

    async def get(
        self, model: str, device: str, *, tp_size: int, block_size: int
    ) -> KVProfile | None:
        found = await self._prefix(model).get(self._device_key(device, tp_size, block_size))
        return found.record if found is not None else None

    async def put(self, profile: KVProfile) -> None:
        name = self._device_key(profile.device, profile.tp_size, profile.block_size)
        await self._prefix(profile.model).put(name, profile)
