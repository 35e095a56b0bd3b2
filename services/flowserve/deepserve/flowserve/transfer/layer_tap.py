"""Layer-by-layer KV export: copies a watched request's KV out of the cache as soon as each
layer of its final prefill step has written it, while the later layers still compute."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from deepserve.flowserve.engine.step_plan import StepPlan
from deepserve.flowserve.transfer.chunks import KVChunk


@dataclass(slots=True)
class _Watch:
    first_block: int
    deliver: Callable[[KVChunk], None]
    layers_done: int = 0
    complete: bool = False


class LayerTap:
    """The model runner's after-layer hook: hands each watched request's layer KV to a callback.

    It fires on the forward thread for the step that runs a watched request's last prompt
    chunk (the one that needs logits): after layer i, layer i of the request's blocks from
    `first_block` on is final, even for chunks computed in earlier steps.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watches: dict[str, _Watch] = {}

    @classmethod
    def attach(cls, executor: Any) -> LayerTap | None:
        """A tap installed on the executor's in-process runner; None when it has none."""
        runner = getattr(executor, "runner", None)
        if runner is None or not hasattr(runner, "after_layer"):
            return None
        tap = cls()
        runner.after_layer = tap
        return tap

    def watch(self, request_id: str, first_block: int, deliver: Callable[[KVChunk], None]) -> None:
        """Start copying a request's blocks [first_block:] out, layer by layer (thread-safe)."""
        with self._lock:
            self._watches[request_id] = _Watch(first_block, deliver)

    def unwatch(self, request_id: str) -> bool:
        """Stop watching; True when every layer had been delivered."""
        with self._lock:
            watch = self._watches.pop(request_id, None)
        return watch is not None and watch.complete

    def __call__(self, plan: StepPlan, layer: int, kv_cache: Any) -> None:
        if not self._watches:
            return
        for seq in plan.sequences:
            if not seq.needs_logits:
                continue
            with self._lock:
                watch = self._watches.get(seq.request_id)
            if watch is None or watch.complete or watch.layers_done != layer:
                continue
            block_ids = seq.block_table[watch.first_block :]
            if block_ids:
                ids = torch.tensor(block_ids, dtype=torch.long, device=kv_cache.data.device)
                # [2, blocks, ...] of this layer -> [1, 2, blocks, ...]: host layout, one layer.
                tensor = kv_cache.data[layer].index_select(1, ids).unsqueeze(0).cpu()
                watch.deliver(KVChunk(watch.first_block, layer, kv_cache.num_layers, tensor))
            watch.layers_done += 1
            if watch.layers_done == kv_cache.num_layers:
                watch.complete = True
