"""The host tier's transport over an executor: per-block host copies of the device KV cache."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch


class HostCopyingExecutor(Protocol):
    """An executor's host copies (deepserve.flowserve.runner.executor.Executor has them)."""

    def copy_to_host(self, block_ids: Sequence[int]) -> torch.Tensor: ...

    def load_from_host(self, block_ids: Sequence[int], tensor: torch.Tensor) -> None: ...


class ExecutorHostTransport:
    """Splits the executor's one-tensor host copies into per-block payloads for the host tier
    (a kv_cache HostTransport), and stacks them back to load."""

    # copy_to_host returns [layers, 2, blocks, block_size, kv_heads, head_dim].
    _BLOCK_DIM = 2

    def __init__(self, executor: HostCopyingExecutor) -> None:
        self._executor = executor

    def copy_to_host(self, block_ids: list[int]) -> list[torch.Tensor]:
        tensor = self._executor.copy_to_host(block_ids)
        # Own storage per block, so dropping one host entry frees its memory.
        return [t.clone() for t in tensor.unbind(self._BLOCK_DIM)]

    def load_from_host(self, block_ids: list[int], payloads: Sequence[torch.Tensor]) -> None:
        self._executor.load_from_host(block_ids, torch.stack(list(payloads), self._BLOCK_DIM))
