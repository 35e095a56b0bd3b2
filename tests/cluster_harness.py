"""Starts `deepserve up` as a real subprocess on free ports and tears it down (integration tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from deepserve.cluster.layout import ClusterLayout
from deepserve.processes import bound_to_parent


@dataclass
class RunningCluster:
    layout: ClusterLayout
    process: subprocess.Popen[bytes]
    log_path: Path

    def pids(self) -> dict[str, int]:
        return json.loads(self.layout.state_file.read_text())["pids"]

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def local_cluster(
    run_dir: Path,
    model: str = "none",
    lease_ttl_s: int = 2,
    timeout_s: float = 120.0,
    extra_args: tuple[str, ...] = (),
) -> Iterator[RunningCluster]:
    """`deepserve up --free-ports`, waiting until it reports ready (cluster.json written)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "up.out"
    argv = [
        sys.executable, "-m", "deepserve.cli.main", "up",
        "--free-ports", "--run-dir", str(run_dir), "--model", model,
        "--lease-ttl", str(lease_ttl_s), *extra_args,
    ]  # fmt: skip
    with log_path.open("wb") as out:
        # Bound to this process: a test run that is killed takes the cluster with it.
        proc = subprocess.Popen(
            bound_to_parent(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
        )
    state = run_dir / "cluster.json"
    deadline = time.monotonic() + timeout_s
    try:
        while not state.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"deepserve up exited:\n{log_path.read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"deepserve up not ready:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield RunningCluster(ClusterLayout.load(run_dir), proc, log_path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
