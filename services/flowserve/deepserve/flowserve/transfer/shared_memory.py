"""Same-host KV transfer through shared memory: the sender writes a tensor into a /dev/shm
segment and sends only its handle; the receiver maps it, reads it and removes it.

Ownership: the receiver unlinks a segment once it has mapped it. A sender unlinks the segments
of a transfer that failed, and sweeps any of its own segments older than a TTL (a receiver
that died before claiming them), so a crash leaks shared memory for at most that long.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import time
import uuid
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from deepserve.errors import FailedPrecondition, InvalidArgument
from deepserve.flowserve.transfer.codec import dtype_from_name, dtype_name, tensor_bytes

SEGMENT_PREFIX = "deepserve-kv-"


@dataclass(frozen=True, slots=True)
class SharedMemoryHandle:
    """Where a tensor lies in shared memory and how to read it back."""

    path: str
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


class SharedMemoryPool:
    """Creates shared-memory segments holding tensors (sender) and claims them (receiver)."""

    def __init__(self, directory: Path = Path("/dev/shm"), ttl_s: float = 300.0) -> None:
        self.directory = directory
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._created: dict[str, float] = {}

    @staticmethod
    def available(directory: Path = Path("/dev/shm")) -> bool:
        return directory.is_dir() and os.access(directory, os.W_OK)

    @property
    def num_outstanding(self) -> int:
        """Segments this pool created that still exist (not yet claimed or discarded)."""
        with self._lock:
            return sum(1 for path in self._created if os.path.exists(path))

    def put(self, tensor: torch.Tensor) -> SharedMemoryHandle:
        """Copy a tensor into a new segment; the handle is what travels to the peer."""
        self.sweep()
        data = tensor_bytes(tensor)
        nbytes = data.numel()
        if nbytes == 0:
            raise InvalidArgument("cannot share an empty tensor", field="tensor")
        path = str(self.directory / f"{SEGMENT_PREFIX}{os.getpid()}-{uuid.uuid4().hex}")
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        with self._lock:
            self._created[path] = time.monotonic()
        try:
            os.ftruncate(fd, nbytes)
            with mmap.mmap(fd, nbytes) as mapped:
                target = torch.frombuffer(mapped, dtype=torch.uint8)
                target.copy_(data)
                del target  # the mapping cannot close while a tensor views it
        except BaseException:
            self.discard([path])
            raise
        finally:
            os.close(fd)
        return SharedMemoryHandle(path, nbytes, dtype_name(tensor.dtype), tuple(tensor.shape))

    @staticmethod
    def take(handle: SharedMemoryHandle) -> torch.Tensor:
        """Map a segment read-only and remove its name; the tensor keeps the mapping alive."""
        if not Path(handle.path).name.startswith(SEGMENT_PREFIX):
            raise InvalidArgument(f"not a KV segment: {handle.path!r}", field="path")
        try:
            fd = os.open(handle.path, os.O_RDONLY)
        except FileNotFoundError:
            raise FailedPrecondition(f"shared-memory segment {handle.path} is gone") from None
        try:
            size = os.fstat(fd).st_size
            if size != handle.nbytes:
                raise InvalidArgument(
                    f"segment has {size} bytes, handle says {handle.nbytes}", field="nbytes"
                )
            mapped = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(handle.path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only buffer; only ever read
            flat = torch.frombuffer(mapped, dtype=torch.uint8)
        return flat.view(dtype_from_name(handle.dtype)).reshape(handle.shape)

    def discard(self, paths: Iterable[str]) -> None:
        """Remove segments that will never be claimed (the transfer failed)."""
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            with self._lock:
                self._created.pop(path, None)

    def sweep(self) -> int:
        """Remove this pool's segments older than the TTL; returns how many existed."""
        cutoff = time.monotonic() - self.ttl_s
        with self._lock:
            old = [path for path, created in self._created.items() if created < cutoff]
            for path in old:
                del self._created[path]
        removed = 0
        for path in old:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed += 1
        return removed
