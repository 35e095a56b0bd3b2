"""`free_port` hands out listening ports that outgoing connections cannot take meanwhile."""

from __future__ import annotations

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
    ports = {free_port() for _ in range(50)}
    assert all(1024 <= port < low for port in ports)
    assert len(ports) > 1  # drawn, not one fixed port


class _Draws:
    """Stands in for the generator: hands out the given ports in order."""

    def __init__(self, *ports: int) -> None:
        self._ports = list(ports)

    def randrange(self, start: int, stop: int) -> int:
        port = self._ports.pop(0)
        assert start <= port < stop
        return port


def test_a_port_taken_by_a_listener_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", free_port()))
        held.listen()
        taken = held.getsockname()[1]
        other = free_port()
        monkeypatch.setattr(processes, "_PORTS", _Draws(taken, other))
        assert free_port() == other


def test_the_port_can_be_bound_by_the_caller() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        assert sock.getsockname()[1] == port
