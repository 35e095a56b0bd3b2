"""The host-DRAM tier of adapters: the last `capacity` adapters used, read from storage once.

An adapter's first request reads its files here, on a worker thread (never the engine loop);
concurrent first requests for one adapter share that read. An adapter evicted from this tier
costs nothing but storage until it is asked for again.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from deepserve.adapters.peft_format import BaseShape
from deepserve.errors import InvalidArgument
from deepserve.flowserve.lora.host_weights import AdapterWeights, load_adapter_weights


class AdapterHostCache:
    """adapter id -> host weights, least recently used out first."""

    def __init__(
        self, base: BaseShape, *, capacity: int, max_rank: int, dtype: torch.dtype
    ) -> None:
        self.base = base
        self.capacity = capacity
        self.max_rank = max_rank
        self.dtype = dtype
        self._lock = threading.Lock()
        self._weights: OrderedDict[str, AdapterWeights] = OrderedDict()
        self._loading: dict[str, asyncio.Future[AdapterWeights]] = {}

    def get_cached(self, adapter_id: str) -> AdapterWeights | None:
        with self._lock:
            weights = self._weights.get(adapter_id)
            if weights is not None:
                self._weights.move_to_end(adapter_id)
            return weights

    async def get(self, adapter_id: str, path: str) -> tuple[AdapterWeights, bool]:
        """The adapter's host weights, and whether this call read them from storage."""
        cached = self.get_cached(adapter_id)
        if cached is not None:
            return cached, False
        pending = self._loading.get(adapter_id)
        if pending is not None:
            return await asyncio.shield(pending), False
        if not path:
            raise InvalidArgument(
                f"adapter {adapter_id!r} is not loaded here and no path was given",
                field="adapter_path",
            )
        future: asyncio.Future[AdapterWeights] = asyncio.get_running_loop().create_future()
        self._loading[adapter_id] = future
        try:
            weights = await asyncio.to_thread(
                load_adapter_weights,
                adapter_id,
                Path(path),
                self.base,
                max_rank=self.max_rank,
                dtype=self.dtype,
            )
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters get it, nobody else must
            raise
        finally:
            self._loading.pop(adapter_id, None)
        future.set_result(weights)
        with self._lock:
            self._weights[adapter_id] = weights
            while len(self._weights) > self.capacity:
                self._weights.popitem(last=False)
        return weights, True

    @property
    def held(self) -> list[str]:
        with self._lock:
            return list(self._weights)
