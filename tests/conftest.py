"""Session-wide real infrastructure: an etcd and a Redis-protocol server on free ports."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from deepserve.cluster.state_stores import start_etcd, start_redis_server
from deepserve.models.catalog import DEFAULT_MODEL
from deepserve.models.pull import pull_model
from deepserve.processes import free_port, wait_for_port


@pytest.fixture(scope="session")
def etcd_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("etcd")
    port, peer = free_port(), free_port()
    proc = start_etcd(root / "data", "127.0.0.1", port, peer, root / "etcd.log")
    if not wait_for_port("127.0.0.1", port, 20):
        proc.stop()
        pytest.fail(f"etcd did not start:\n{proc.tail()}")
    yield f"127.0.0.1:{port}"
    proc.stop()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("redis")
    port = free_port()
    proc = start_redis_server(root / "data", "127.0.0.1", port, root / "redis.log")
    if not wait_for_port("127.0.0.1", port, 20):
        proc.stop()
        pytest.fail(f"redis-protocol server did not start:\n{proc.tail()}")
    yield f"redis://127.0.0.1:{port}/0"
    proc.stop()


@pytest.fixture(scope="session")
def model_cache_dir() -> Path:
    """Where pulled models live; shared across tests so the default model converts once."""
    return Path(os.environ.get("DEEPSERVE_MODEL_CACHE", Path.home() / ".cache/deepserve/models"))


@pytest.fixture(scope="session")
def default_model_dir(model_cache_dir: Path) -> Path:
    """The default model, pulled (once) if this machine lacks it, so any test can run first."""
    return pull_model(DEFAULT_MODEL, model_cache_dir, progress=print)
