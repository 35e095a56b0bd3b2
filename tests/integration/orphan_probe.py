"""Not collected on its own: a test run that `test_no_orphans` starts and then kills.

It takes the session's etcd and Redis-protocol fixtures, starts a scheduler as a managed child
the way integration tests do, writes every descendant's pid to $DEEPSERVE_PROBE_PIDS, and waits
to be killed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from deepserve.processes import ManagedProcess, free_port, wait_for_port

# A suite started in the background of a non-interactive shell (`./scripts/test.sh &`) runs with
# SIGINT ignored, and this run inherits that: Python then never turns SIGINT into
# KeyboardInterrupt. What is tested is a user's Ctrl-C on a foreground run, so restore it.
signal.signal(signal.SIGINT, signal.default_int_handler)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def test_probe_waits_to_be_killed(etcd_endpoint: str, redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    scheduler = ManagedProcess(
        "scheduler",
        [sys.executable, "-m", "deepserve.scheduler"],
        tmp_path / "scheduler.log",
        env={
            **os.environ,
            "DEEPSERVE_ETCD_ENDPOINT": etcd_endpoint,
            "DEEPSERVE_REDIS_URL": redis_url,
            "DEEPSERVE_SCHEDULER_GRPC_PORT": str(port),
        },
    ).start()
    try:
        assert wait_for_port("127.0.0.1", port, 60), scheduler.tail()
        Path(os.environ["DEEPSERVE_PROBE_PIDS"]).write_text(json.dumps(descendants(os.getpid())))
        time.sleep(600)
    finally:
        scheduler.stop()
