"""Test hosts on one machine: Linux network namespaces joined by veth pairs to one bridge.

Each host is a namespace with its own loopback and one interface (`eth0`) addressed in the
benchmarking range 198.18.0.0/15 (RFC 2544), on a /24 of its own per fabric. The bridge and the
host-side veth ends live in the root namespace; the bridge gets the subnet's .254 so the test
process can reach the hosts, and nothing routes beyond the /24: no packet leaves for anywhere
else. A fabric removes everything it made on exit, failure included (processes it started in
its namespaces first, then namespaces, veths and bridge). Needs root (CAP_NET_ADMIN, SYS_ADMIN).

`cut(host)` sets the host's link down (it keeps running, unreachable) and `restore(host)` brings
it back. netem (`tc qdisc ... netem`) adds delay where the kernel has the module.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deepserve.processes import ManagedProcess

BENCH_RANGE = ipaddress.ip_network("198.18.0.0/15")


def can_make_namespaces() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


def ip(*args: str, ns: str | None = None, check: bool = True) -> str:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def _used_subnets() -> set[str]:
    out = ip("-4", "-o", "addr", "show")
    return {str(ipaddress.ip_interface(m).network) for m in re.findall(r"inet (\S+)", out)}


def netem_available() -> bool:
    """Whether this kernel offers the netem qdisc (tried on a throwaway namespace)."""
    name = f"dsprobe{os.getpid()}"
    try:
        ip("netns", "add", name)
        done = subprocess.run(
            ["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
             "delay", "1ms"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        return done.returncode == 0
    finally:
        ip("netns", "del", name, check=False)


@dataclass
class Host:
    name: str  # the test's name for it (also its DEEPSERVE_HOST_NAME)
    netns: str
    address: str
    veth: str  # the root-side end, which `cut` sets down


@dataclass
class Fabric:
    """Namespaces on one bridge; start processes in them with `spawn`."""

    tag: str
    subnet: ipaddress.IPv4Network
    bridge: str
    hosts: dict[str, Host] = field(default_factory=dict)
    procs: list[tuple[str, ManagedProcess]] = field(default_factory=list)

    @property
    def outside(self) -> str:
        """The root namespace's address on the bridge (where the test process talks from)."""
        return str(self.subnet.network_address + 254)

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def spawn(
        self, host: str, name: str, argv: Sequence[str], log: Path, env: dict[str, str]
    ) -> ManagedProcess:
        """Starts `argv` inside the host's namespace (its own process group)."""
        proc = ManagedProcess(
            name, ["ip", "netns", "exec", self.hosts[host].netns, *argv], log, env=env
        ).start()
        self.procs.append((host, proc))
        return proc

    def pids(self, host: str) -> list[int]:
        out = ip("netns", "pids", self.hosts[host].netns, check=False)
        return [int(p) for p in out.split()]

    def kill_host(self, host: str) -> None:
        """Every process of the host dies at once (a machine losing power)."""
        for pid in self.pids(host):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def cut(self, host: str) -> None:
        ip("link", "set", self.hosts[host].veth, "down")

    def restore(self, host: str) -> None:
        ip("link", "set", self.hosts[host].veth, "up")

    def link_bytes(self, host: str) -> tuple[int, int]:
        """(bytes the host sent, bytes it received) on its link, read from the root side."""
        stats = Path("/sys/class/net") / self.hosts[host].veth / "statistics"
        # The root-side end receives what the host sends.
        return int((stats / "rx_bytes").read_text()), int((stats / "tx_bytes").read_text())

    def delay(self, host: str, ms: float) -> None:
        subprocess.run(
            ["ip", "netns", "exec", self.hosts[host].netns, "tc", "qdisc", "replace", "dev",
             "eth0", "root", "netem", "delay", f"{ms}ms"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip

    def stop_processes(self) -> None:
        for _, proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop(10.0)
        # Anything still inside (children of what we started) ends with its namespace.
        for name in self.hosts:
            for pid in self.pids(name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _free_subnet() -> ipaddress.IPv4Network:
    used = _used_subnets()
    subnets = list(BENCH_RANGE.subnets(new_prefix=24))
    random.shuffle(subnets)
    for subnet in subnets:
        if str(subnet) not in used:
            return subnet
    raise RuntimeError("no free /24 in 198.18.0.0/15")


@contextlib.contextmanager
def fabric(names: Sequence[str]) -> Iterator[Fabric]:
    """Namespaces `names` (host i gets the subnet's address i + 1), torn down on exit."""
    tag = f"{os.getpid() % 100000:05d}{random.randrange(36**2):02x}"[-6:]
    subnet = _free_subnet()
    fab = Fabric(tag=tag, subnet=subnet, bridge=f"dsb{tag}")
    try:
        ip("link", "add", fab.bridge, "type", "bridge")
        ip("addr", "add", f"{fab.outside}/24", "dev", fab.bridge)
        ip("link", "set", fab.bridge, "up")
        for i, name in enumerate(names):
            host = Host(
                name=name,
                netns=f"ds{tag}-{name}",
                address=str(subnet.network_address + i + 1),
                veth=f"dsv{tag}{i}",
            )
            ip("netns", "add", host.netns)
            fab.hosts[name] = host
            ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0",
               "netns", host.netns)  # fmt: skip
            ip("link", "set", host.veth, "master", fab.bridge)
            ip("link", "set", host.veth, "up")
            ip("link", "set", "lo", "up", ns=host.netns)
            ip("addr", "add", f"{host.address}/24", "dev", "eth0", ns=host.netns)
            ip("link", "set", "eth0", "up", ns=host.netns)
        yield fab
    finally:
        fab.stop_processes()
        for host in fab.hosts.values():
            ip("link", "del", host.veth, check=False)
            ip("netns", "del", host.netns, check=False)
        ip("link", "del", fab.bridge, check=False)
