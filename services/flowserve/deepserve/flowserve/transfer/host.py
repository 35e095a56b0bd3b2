"""Which machine this process runs on, so two instances can tell they share memory."""

from __future__ import annotations

import functools
import socket
from pathlib import Path


@functools.cache
def local_host_id() -> str:
    """Hostname plus boot id: equal only for processes on the same running kernel."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = ""
    return f"{socket.gethostname()}/{boot_id}"
