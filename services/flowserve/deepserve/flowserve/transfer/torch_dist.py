"""KV transfer over torch.distributed point-to-point send/recv, for two processes that share
(or build) a process group. The control message (gRPC, a pipe) carries only a DistHandle;
the bytes go over the group's backend (gloo on CPU; nccl/hccl groups move device tensors).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from deepserve.flowserve.transfer.codec import dtype_from_name, dtype_name


@dataclass(frozen=True, slots=True)
class DistHandle:
    """Which send to match (tag) and what it carries."""

    tag: int
    dtype: str
    shape: tuple[int, ...]


class DistKVLink:
    """One end of a point-to-point tensor link inside a process group."""

    def __init__(self, group: Any, peer_rank: int, *, timeout_s: float = 30.0) -> None:
        self.group = group
        self.peer_rank = peer_rank
        self.timeout = timedelta(seconds=timeout_s)
        self._tags = itertools.count(1)
        self._pending: list[Any] = []

    @classmethod
    def connect(cls, host: str, port: int, rank: int, *, timeout_s: float = 30.0) -> DistKVLink:
        """A private two-rank gloo group (rank 0 hosts the rendezvous store at host:port).

        It leaves the default process group alone, so an engine that already runs tensor
        parallel can still open one link per peer.
        """
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, 2, rank == 0, timeout)
        group = dist.ProcessGroupGloo(store, rank, 2, timeout)
        link = cls(group, 1 - rank, timeout_s=timeout_s)
        link._store = store  # type: ignore[attr-defined]  # keeps the rendezvous alive
        return link

    def send(self, tensor: torch.Tensor) -> DistHandle:
        """Start sending a tensor; the returned handle tells the peer how to receive it."""
        tag = next(self._tags)
        payload = tensor.contiguous()
        self._pending.append((self.group.send([payload], self.peer_rank, tag), payload))
        return DistHandle(tag, dtype_name(payload.dtype), tuple(payload.shape))

    def flush(self) -> None:
        """Wait until every started send has been received (raises on timeout or peer loss)."""
        pending, self._pending = self._pending, []
        for work, _payload in pending:
            work.wait(self.timeout)

    def recv(self, handle: DistHandle, device: torch.device | str = "cpu") -> torch.Tensor:
        """Receive the tensor a peer's send(...) described with `handle`."""
        tensor = torch.empty(handle.shape, dtype=dtype_from_name(handle.dtype), device=device)
        self.group.recv([tensor], self.peer_rank, handle.tag).wait(self.timeout)
        return tensor
