"""`free_port` hands out listening ports that outgoing connections cannot take meanwhile, and
never the same one twice in a process."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from deepserve import processes
from deepserve.processes import free_port


def _ephemeral_range() -> tuple[int, int]:
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(low), int(high)


def test_ports_lie_below_the_kernels_ephemeral_range() -> None:
    low, _ = _ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert all(1024 <= port < low for port in ports)


def test_a_process_never_gets_the_same_port_twice() -> None:
    # A cluster takes eight at once; none of them may repeat.
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)


def test_a_port_taken_by_a_listener_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", free_port()))
        held.listen()
        taken = held.getsockname()[1]
        # The next candidate is the listener's port: it is passed over for a free one.
        monkeypatch.setattr(processes, "_next_port", taken)
        monkeypatch.setattr(processes, "_next_port_pid", os.getpid())
        port = free_port()
        assert port != taken
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_forked_child_draws_its_own_start(monkeypatch: pytest.MonkeyPatch) -> None:
    # State inherited from another pid (a zygote's) is not reused: the child starts afresh.
    monkeypatch.setattr(processes, "_next_port", 20_000)
    monkeypatch.setattr(processes, "_next_port_pid", os.getpid() + 1)

    class _Start:
        def randrange(self, start: int, stop: int) -> int:
            return 25_000

    monkeypatch.setattr(processes, "_PORTS", _Start())
    assert free_port() >= 25_000


def test_the_port_can_be_bound_by_the_caller() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        assert sock.getsockname()[1] == port
