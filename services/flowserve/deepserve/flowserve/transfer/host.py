"""Which machine this process runs on, so two instances can tell they share memory."""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path


@functools.cache
def local_host_id() -> str:
    """Hostname, boot id and network namespace: equal only for processes on the same running
    kernel that also share a network. Separate network namespaces count as separate hosts (a
    Kubernetes pod has its own /dev/shm too, and the namespace test hosts must use the wire)."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = ""
    try:
        netns = str(os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        netns = ""
    return f"{socket.gethostname()}/{boot_id}/{netns}"
