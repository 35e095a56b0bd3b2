"""A DeepServe cluster across namespace hosts: the control plane (`deepserve up`, pods from the
`hosts` backend) on host `cp`, a host agent on each pod host, each binding its own address."""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from deepserve.cluster.layout import ClusterLayout
from deepserve.processes import ManagedProcess, with_owner
from tests.multihost.netns import Fabric, fabric

CONTROL = "cp"


@dataclass
class MultiHostCluster:
    fabric: Fabric
    layout: ClusterLayout
    run_dir: Path
    env: dict[str, str]
    agents: dict[str, ManagedProcess]

    @property
    def control(self) -> str:
        return self.fabric[CONTROL].address

    @property
    def gateway_url(self) -> str:
        return f"http://{self.control}:{self.layout.ports.gateway_http}"

    def jobmgr(self) -> str:
        return self.layout.address("jobmgr")

    def host_of(self, address: str) -> str:
        """The test host whose address `address` (host:port) is on."""
        ip = address.rsplit(":", 1)[0]
        for host in self.fabric.hosts.values():
            if host.address == ip:
                return host.name
        raise KeyError(address)

    def start_agent(self, host: str) -> ManagedProcess:
        addr = self.fabric[host].address
        cache = Path("/dev/shm") / f"deepserve-mh-{self.fabric.tag}-{host}"
        env = {
            **self.env,
            "DEEPSERVE_HOST": addr,
            "DEEPSERVE_HOST_NAME": host,
            "DEEPSERVE_PODPOOL_POD_LOG_DIR": str(self.run_dir / host / "pods"),
            # Each host its own weights cache (DRAM copies), as on separate machines.
            "DEEPSERVE_PODPOOL_WEIGHTS_CACHE_DIR": str(cache),
        }
        proc = self.fabric.spawn(
            host,
            f"podhost-{host}",
            [sys.executable, "-m", "deepserve.podpool.host_agent"],
            self.run_dir / host / "agent.log",
            env,
        )
        self.agents[host] = proc
        return proc

    def logs(self) -> str:
        out = []
        for path in sorted(self.run_dir.rglob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-15:]
            out.append(f"--- {path}\n" + "\n".join(text))
        return "\n".join(out)


@contextmanager
def multihost_cluster(
    run_dir: Path,
    pod_hosts: Sequence[str] = ("h1", "h2"),
    *,
    warm_pods: int = 2,
    lease_ttl_s: int = 2,
    env: dict[str, str] | None = None,
    timeout_s: float = 120.0,
) -> Iterator[MultiHostCluster]:
    run_dir.mkdir(parents=True, exist_ok=True)
    with fabric([CONTROL, *pod_hosts]) as fab:
        control = fab[CONTROL].address
        layout = ClusterLayout(run_dir=run_dir / CONTROL, host=control)
        base = with_owner(
            {
                **os.environ,
                **(env or {}),
                "PYTHONUNBUFFERED": "1",
                "DEEPSERVE_ETCD_ENDPOINT": layout.etcd_endpoint,
                "DEEPSERVE_REDIS_URL": layout.redis_url,
                "DEEPSERVE_LEASE_TTL_S": str(lease_ttl_s),
                "DEEPSERVE_TELEMETRY_DIR": str(run_dir / "telemetry"),
                "DEEPSERVE_PODPOOL_BACKEND": "hosts",
                "DEEPSERVE_PODPOOL_POD_START": "zygote",
                "DEEPSERVE_PODPOOL_POD_THREADS": "1",
            }
        )
        cluster = MultiHostCluster(fab, layout, run_dir, base, {})
        argv = [
            sys.executable, "-m", "deepserve.cli.main", "up", "--model", "none",
            "--host", control, "--run-dir", str(layout.run_dir),
            "--warm-pods", str(warm_pods), "--lease-ttl", str(lease_ttl_s),
            "--allow-open-remote", "--startup-timeout", str(timeout_s),
        ]  # fmt: skip
        up = fab.spawn(
            CONTROL, "up", argv, run_dir / "up.log", {**base, "DEEPSERVE_HOST_NAME": CONTROL}
        )
        # Agents start beside the control plane: they wait for etcd; `up` waits for a pod.
        for host in pod_hosts:
            cluster.start_agent(host)
        deadline = time.monotonic() + timeout_s
        while not layout.state_file.exists():
            if not up.alive():
                raise RuntimeError(f"deepserve up exited:\n{cluster.logs()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"deepserve up not ready:\n{cluster.logs()}")
            time.sleep(0.2)
        cluster.layout = ClusterLayout.load(layout.run_dir)
        try:
            yield cluster
        finally:
            import shutil

            for host in pod_hosts:
                shutil.rmtree(f"/dev/shm/deepserve-mh-{fab.tag}-{host}", ignore_errors=True)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"
