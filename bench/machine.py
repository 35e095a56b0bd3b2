"""What a benchmark figure was measured on: the CPU model, the load, and any platform processes
already running (they share the cores, so a figure taken beside them is not comparable)."""

from __future__ import annotations

import os
import time
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


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return found


def _role(command: str) -> str:
    """A short name for a platform process: its module (deepserve.podpool -> podpool)."""
    parts = command.split()
    if "-m" in parts and parts.index("-m") + 1 < len(parts):
        module = parts[parts.index("-m") + 1]
        if module == "deepserve.flowserve.pod.zygote":
            return "pods (zygote children)"
        return module.removeprefix("deepserve.")
    name = Path(parts[0]).name if parts else "?"
    return "etcd" if name == "etcd" else name


def cpu_seconds_by_role(*root_pids: int) -> dict[str, float]:
    """User + system CPU seconds of every live process under `root_pids`, by role. A forked
    child shows its parent's command line, so pods count under the zygote."""
    ticks = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {}
    stack, seen = list(root_pids), set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue
        seconds = (int(stat[11]) + int(stat[12])) / ticks
        role = _role(command)
        totals[role] = totals.get(role, 0.0) + seconds
        stack.extend(_children(pid))
    return totals


def cpu_spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds each role spent between two `cpu_seconds_by_role` readings, largest first."""
    spent = {role: after[role] - before.get(role, 0.0) for role in after}
    return dict(sorted(((r, s) for r, s in spent.items() if s > 0.005), key=lambda x: -x[1]))


def busy_cores(window_s: float = 0.25) -> float:
    """Cores' worth of CPU the whole host spent over the next `window_s` (from /proc/stat)."""

    def busy_and_total() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    busy0, total0 = busy_and_total()
    time.sleep(window_s)
    busy1, total1 = busy_and_total()
    if total1 == total0:
        return 0.0
    return (busy1 - busy0) / (total1 - total0) * (os.cpu_count() or 1)


def wait_until_quiet(
    threshold_cores: float = 0.25, quiet_windows: int = 2, timeout_s: float = 15.0
) -> float:
    """Waits until the host has been nearly idle for `quiet_windows` windows in a row (or the
    timeout); returns the seconds waited. A server that keeps its cores busy after its work
    (vLLM's CPU worker spins about a second after each request here) would otherwise bill the
    next system measured for that time."""
    started = time.monotonic()
    quiet = 0
    while quiet < quiet_windows and time.monotonic() - started < timeout_s:
        quiet = quiet + 1 if busy_cores() < threshold_cores else 0
    return time.monotonic() - started
