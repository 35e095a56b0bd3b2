"""Where a local cluster keeps its state, and the ports its processes use.

The run directory holds etcd's data (so a restart finds jobs and keys again), one log per
process, the span files, and `cluster.json`: the endpoints of a running cluster, read by
`deepserve status` and by tests.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deepserve.processes import free_port

SERVICES = ("scheduler", "jobmgr", "podpool", "gateway", "flowserve")
# Started by the launcher itself; flowserve pods are started by podpool.
LAUNCHED_SERVICES = ("scheduler", "jobmgr", "podpool", "gateway")


def default_run_dir() -> Path:
    return Path(os.environ.get("DEEPSERVE_RUN_DIR", Path.home() / ".deepserve" / "run"))


@dataclass
class ClusterPorts:
    """Every listening port of a local cluster."""

    etcd: int = 2379
    etcd_peer: int = 2380
    redis: int = 6379
    gateway_http: int = 8000
    gateway: int = 50050
    jobmgr: int = 50051
    scheduler: int = 50052
    podpool: int = 50053

    @classmethod
    def free(cls) -> ClusterPorts:
        return cls(**{name: free_port() for name in cls.__dataclass_fields__})


@dataclass
class ClusterLayout:
    run_dir: Path
    host: str = "127.0.0.1"
    ports: ClusterPorts = field(default_factory=ClusterPorts)

    @property
    def etcd_endpoint(self) -> str:
        return f"{self.host}:{self.ports.etcd}"

    @property
    def redis_url(self) -> str:
        return f"redis://{self.host}:{self.ports.redis}/0"

    @property
    def gateway_url(self) -> str:
        return f"http://{self.host}:{self.ports.gateway_http}"

    def address(self, service: str) -> str:
        return f"{self.host}:{getattr(self.ports, service)}"

    @property
    def pod_log_dir(self) -> Path:
        return self.run_dir / "logs" / "pods"

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def telemetry_dir(self) -> Path:
        return self.run_dir / "telemetry"

    @property
    def etcd_data_dir(self) -> Path:
        return self.run_dir / "etcd"

    @property
    def state_file(self) -> Path:
        return self.run_dir / "cluster.json"

    def save(self, pids: dict[str, int]) -> None:
        data = {
            "host": self.host,
            "ports": asdict(self.ports),
            "pids": pids,
            "etcd_endpoint": self.etcd_endpoint,
            "redis_url": self.redis_url,
            "gateway_url": self.gateway_url,
        }
        # Atomic: `deepserve status` and tests read it while the supervisor rewrites it.
        partial = self.state_file.with_suffix(".json.tmp")
        partial.write_text(json.dumps(data, indent=2))
        os.replace(partial, self.state_file)

    @classmethod
    def load(cls, run_dir: Path) -> ClusterLayout:
        data = json.loads((run_dir / "cluster.json").read_text())
        return cls(run_dir=run_dir, host=data["host"], ports=ClusterPorts(**data["ports"]))
