"""What a benchmark figure was measured on: the CPU model, the load, and any platform processes
already running (they share the cores, so a figure taken beside them is not comparable)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Command-line fragments of DeepServe's own processes and of the stores it starts.
PLATFORM_MARKERS = (
    "-m deepserve",
    "bin/deepserve ",
    "deepserve.flowserve",
    "bin/etcd ",
    "valkey-server",
    "redis-server",
)


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it ("unknown" elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def machine_line() -> str:
    """One line naming the machine and its load, printed above every table."""
    one, five, fifteen = load_average()
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"machine: {cpu_model()}, {os.cpu_count()} cores, {memory_gib:.0f} GiB; "
        f"load average {one:.2f} / {five:.2f} / {fifteen:.2f}"
    )


@dataclass(frozen=True, slots=True)
class ForeignProcess:
    pid: int
    command: str


def _ancestors(pid: int) -> set[int]:
    chain: set[int] = set()
    while pid > 1 and pid not in chain:
        chain.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return chain


def platform_processes() -> list[ForeignProcess]:
    """Running platform processes (services, pods, stores) that this benchmark did not start."""
    me = os.getpid()
    mine = _ancestors(me)
    found: list[ForeignProcess] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid in mine:
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        command = raw.replace(b"\0", b" ").decode(errors="replace").strip()
        if any(marker in command for marker in PLATFORM_MARKERS) and me not in _ancestors(pid):
            found.append(ForeignProcess(pid, command[:120]))
    return sorted(found, key=lambda p: p.pid)
