"""The local cluster's state stores as child processes: etcd and a Redis-protocol server."""

from __future__ import annotations

import os
from pathlib import Path

from deepserve.processes import ManagedProcess


def start_etcd(
    data_dir: Path, host: str, client_port: int, peer_port: int, log_path: Path, *, nice: int = 0
) -> ManagedProcess:
    from deepserve.cluster.binaries import etcd_binary

    client_url = f"http://{host}:{client_port}"
    peer_url = f"http://{host}:{peer_port}"
    argv = [
        str(etcd_binary()),
        "--name", "deepserve-local",
        "--data-dir", str(data_dir),
        "--listen-client-urls", client_url,
        "--advertise-client-urls", client_url,
        "--listen-peer-urls", peer_url,
        "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", f"deepserve-local={peer_url}",
        "--log-level", "warn",
        # Keep history bounded; watchers re-list on compaction.
        "--auto-compaction-mode", "revision",
        "--auto-compaction-retention", "10000",
    ]  # fmt: skip
    env = {**os.environ, "ETCD_UNSUPPORTED_ARCH": os.environ.get("ETCD_UNSUPPORTED_ARCH", "")}
    return ManagedProcess("etcd", argv, log_path, env=env, nice=nice).start()


def start_redis_server(
    data_dir: Path, host: str, port: int, log_path: Path, *, nice: int = 0
) -> ManagedProcess:
    from deepserve.cluster.binaries import redis_server_binary

    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        str(redis_server_binary()),
        "--bind", host,
        "--port", str(port),
        "--dir", str(data_dir),
        # Hot state only: no persistence, losing it costs routing quality, not correctness.
        "--save", "",
        "--appendonly", "no",
        "--protected-mode", "no",
    ]  # fmt: skip
    return ManagedProcess("redis", argv, log_path, nice=nice).start()
