"""The physical limit of a same-host fork: a plain copy of the same bytes into fresh shared
memory, measured in the same run as the fork so the two rates are comparable.

On a VM the first touch of guest memory (the kernel zeroing each new page) can cost more than
the copy itself; a fork into `/dev/shm` pays it too. This copies a file's bytes with `pwrite`
(no page faults on the destination, the kernel allocates and fills each page in one pass) into a
new file in `shm_dir`, and returns the rate.
"""

from __future__ import annotations

import mmap
import os
import time
import uuid
from pathlib import Path

CHUNK = 64 << 20


def fresh_copy_gbps(source: Path, shm_dir: Path = Path("/dev/shm")) -> tuple[int, float]:
    """Copies `source` (already in memory: a tmpfs file or the page cache) into a new file in
    `shm_dir`; returns (bytes, GB/s). The copy is deleted afterwards."""
    target = shm_dir / f"fresh-copy-{uuid.uuid4().hex[:8]}"
    with source.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        view = memoryview(mapped)
        view[::4096].tobytes()  # the source's pages are mapped before the clock starts
        fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            started = time.perf_counter()
            for offset in range(0, size, CHUNK):
                os.pwrite(fd, view[offset : offset + CHUNK], offset)
            seconds = time.perf_counter() - started
        finally:
            os.close(fd)
            view.release()
    finally:
        mapped.close()
        target.unlink(missing_ok=True)
    return size, size / max(seconds, 1e-9) / 1e9
