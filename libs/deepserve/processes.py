"""Child processes of the local cluster: started in their own process group, logged to a file,
stopped with SIGTERM then SIGKILL so nothing is left behind.

Nothing outlives whoever started the cluster, even when that process is SIGKILLed and runs no
cleanup. Two mechanisms, because pods must survive their own parent:
- a parent-death signal (`prctl(PR_SET_PDEATHSIG)`, armed by `bound_to_parent`): etcd, the
  Redis-protocol server and the services die with the process that started them (`deepserve up`,
  a test fixture);
- an owner: every managed child's environment names the cluster's owner process
  (`DEEPSERVE_OWNER_PID`, the first process up the tree that started a managed child), and
  `exit_with_owner` (run by every service, every pod and the pod zygote) ends the process when
  the owner exits. Pods are started by podpool but must not die with it (a podpool restart
  re-adopts them from etcd, and a podpool crash must not take every model instance down with
  it), so they rely on the owner alone.

The kernel sends the parent-death signal when the *thread* that forked the child exits, so a
process bound to its parent is started from a thread that lives as long as the process (the
main thread; an asyncio loop's).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

# The environment variable naming the process whose exit ends every process of the cluster.
OWNER_ENV = "DEEPSERVE_OWNER_PID"
_PR_SET_PDEATHSIG = 1


# Run by a bare interpreter between our fork and the child's program: arm the parent-death
# signal (where prctl exists), close the race with a parent that already died, then become the
# child's program.
_ARM_AND_EXEC = f"""
import ctypes, os, sys
parent, sig, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
try:
    ctypes.CDLL(None, use_errno=True).prctl({_PR_SET_PDEATHSIG}, sig, 0, 0, 0)
except (OSError, AttributeError):
    pass
else:
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)
os.execvp(argv[0], argv)
"""


def bound_to_parent(argv: Sequence[str], sig: int = signal.SIGKILL) -> list[str]:
    """`argv` wrapped so that the child receives `sig` when this process (the thread that
    starts it) exits.

    The signal is armed by a bare interpreter that then execs `argv` (the signal survives
    exec), never by a `preexec_fn`: with one, CPython runs every library's at-fork hooks in the
    child of a threaded process, and filelock's (4.3) crashed such children with SIGSEGV."""
    return [sys.executable, "-I", "-S", "-c", _ARM_AND_EXEC, str(os.getpid()), str(sig), *argv]


def with_owner(env: Mapping[str, str] | None) -> dict[str, str]:
    """`env` (default: this process's) naming the cluster's owner: the one already named, else
    this process."""
    out = dict(os.environ if env is None else env)
    out.setdefault(OWNER_ENV, os.environ.get(OWNER_ENV) or str(os.getpid()))
    return out


def exit_with_owner(owner: str | None = None) -> threading.Thread | None:
    """Ends this process (and its process group, when it leads one) once the cluster's owner
    exits; returns the watching thread, or None when no owner is named.

    Waits on a pidfd (no polling, no pid reuse), or checks every second where there is none.
    """
    value = owner if owner is not None else os.environ.get(OWNER_ENV, "")
    if not value.strip():
        return None
    try:
        pid = int(value)
    except ValueError:
        log.warning("ignoring %s=%r: not a process id", OWNER_ENV, value)
        return None
    if pid == os.getpid():
        return None
    thread = threading.Thread(target=_watch_owner, args=(pid,), name="owner-watch", daemon=True)
    thread.start()
    return thread


def _watch_owner(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        _die(pid)
        return
    except (OSError, AttributeError):
        while _pid_alive(pid):
            time.sleep(1.0)
        _die(pid)
        return
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while not poller.poll():
        pass
    _die(pid)


def _die(owner: int) -> None:
    log.warning("the cluster's owner (pid %d) exited; exiting too", owner)
    # A process that leads its own group takes its helpers (engine workers) with it.
    if os.getpgrp() == os.getpid():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or name to listen on) reaches this machine only."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name, or "" (every interface): not provably loopback


# Listening ports are drawn from below the kernel's ephemeral range. A port the kernel hands out
# for `bind(0)` lies inside that range, and between our probe and the service's own bind any
# outgoing connection on the host may take it as its local port: a clean-clone CI run lost a
# gateway to exactly that ("address already in use" on a port a gRPC client had just taken).
_LISTEN_PORTS_FLOOR = 10_000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# Ports are handed out in turn from a start drawn at random, as the kernel does for its own range:
# never the same one twice in a process (a cluster's eight ports must differ, and independent
# draws would repeat one in about a thousand starts), and rarely one another process is using.
# The start comes from the OS, and again in a forked child (pods forked from the zygote).
_PORTS = random.SystemRandom()
_port_lock = threading.Lock()
_next_port: int | None = None
_next_port_pid = 0


def _ephemeral_floor() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _candidate_port(ceiling: int) -> int:
    global _next_port, _next_port_pid
    span = ceiling - _LISTEN_PORTS_FLOOR
    with _port_lock:
        if (
            _next_port is None
            or _next_port_pid != os.getpid()
            or not 0 <= _next_port - _LISTEN_PORTS_FLOOR < span
        ):
            _next_port = _PORTS.randrange(_LISTEN_PORTS_FLOOR, ceiling)
            _next_port_pid = os.getpid()
        port = _next_port
        _next_port = _LISTEN_PORTS_FLOOR + (port + 1 - _LISTEN_PORTS_FLOOR) % span
        return port


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on now, no outgoing connection will take, and
    this process has not handed out before (until the range wraps around)."""
    ceiling = _ephemeral_floor()
    if ceiling - _LISTEN_PORTS_FLOOR >= 1000:
        for _ in range(200):
            port = _candidate_port(ceiling)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
                return port
    # A host whose ephemeral range starts low: let the kernel choose.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return True
        time.sleep(0.05)
    return False


class ManagedProcess:
    """One child process with its log file; `stop()` ends it and its whole process group.

    The child names the cluster's owner in its environment (see the module docstring) and, with
    `bind_to_parent` (the default), also dies when this process does.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        *,
        bind_to_parent: bool = True,
        nice: int = 0,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = with_owner(env)
        self.cwd = cwd
        self.bind_to_parent = bind_to_parent
        # Added to the niceness it inherits (lower CPU priority; children inherit it too).
        self.nice = nice
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            bound_to_parent(self.argv) if self.bind_to_parent else self.argv,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,  # own process group: signals to us don't hit it twice
            # Runs in the forked child before exec: lowers its CPU priority.
            preexec_fn=functools.partial(os.nice, self.nice) if self.nice else None,
        )
        log_file.close()
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM the process group, wait, then SIGKILL whatever is left."""
        if self.popen is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait(5)
        # Children that outlived the leader (e.g. engine workers) share its group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        return self.popen.returncode

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""
