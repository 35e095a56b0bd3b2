"""`deepserve up --control-plane-nice`: the control plane's processes run at a lower CPU priority,
podpool (whose pods inherit its priority) and the pods do not."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from deepserve.cluster.launcher import LaunchOptions, LocalCluster
from deepserve.cluster.layout import ClusterLayout, ClusterPorts
from deepserve.processes import ManagedProcess


def niceness(pid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, pid)


def expected(increment: int) -> int:
    return min(19, niceness(0) + increment)


def test_a_managed_process_runs_at_the_niceness_it_was_given(tmp_path: Path) -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    niced = ManagedProcess("niced", sleeper, tmp_path / "niced.log", nice=5).start()
    plain = ManagedProcess("plain", sleeper, tmp_path / "plain.log").start()
    try:
        assert niceness(niced.pid) == expected(5)
        assert niceness(plain.pid) == niceness(0)
    finally:
        niced.stop()
        plain.stop()


def test_up_lowers_every_service_but_podpool(tmp_path: Path) -> None:
    layout = ClusterLayout(run_dir=tmp_path / "run", ports=ClusterPorts.free())
    cluster = LocalCluster(LaunchOptions(layout=layout, control_plane_nice=6), say=lambda _: None)
    # Nothing listens on the stores' ports: the services only have to exist to be looked at.
    started = [cluster.start_service(name) for name in ("gateway", "scheduler", "podpool")]
    try:
        by_name = {proc.name: niceness(proc.pid) for proc in started}
        assert by_name == {"gateway": expected(6), "scheduler": expected(6), "podpool": niceness(0)}
    finally:
        for proc in started:
            proc.stop()
