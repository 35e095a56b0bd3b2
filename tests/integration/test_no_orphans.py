"""Nothing a test run or `deepserve up` starts outlives it, however it ends.

Starts real processes: a pytest run with etcd, valkey-server and a scheduler (then SIGTERM or
SIGINT to it), `deepserve up` with a zygote and a warm pod (then SIGKILL to it), and small
process trees of managed children (then SIGKILL to their parents).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from deepserve import records
from deepserve.store.etcd import EtcdStore
from tests.cluster_harness import local_cluster
from tests.integration.orphan_probe import descendants

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pids: list[int], timeout_s: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def wait_file(path: Path, proc: subprocess.Popen[bytes], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while not path.exists() or not path.read_text():
        assert proc.poll() is None, f"exited early with {proc.returncode}"
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.1)
    return path.read_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_stopped_test_run_leaves_no_process(tmp_path: Path, sig: signal.Signals) -> None:
    pids_file = tmp_path / "pids.json"
    log_path = tmp_path / "probe.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
                "--timeout", "0", "tests/integration/orphan_probe.py",
            ],
            cwd=ROOT,
            env={**os.environ, "DEEPSERVE_PROBE_PIDS": str(pids_file)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        pids = json.loads(wait_file(pids_file, proc, 90))
        assert len(pids) >= 3  # etcd, valkey-server, the scheduler (and their helpers)
        proc.send_signal(sig)
        # Its teardown stops three processes, each given 10 s to exit on SIGTERM before a
        # SIGKILL: on a loaded CI host that took over 60 s once. Its output says where it was.
        try:
            proc.wait(150)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"the stopped run did not exit; its output:\n{log_path.read_text()[-3000:]}"
            )
        assert wait_gone(pids) == []
    finally:
        if proc.poll() is None:
            proc.kill()


def test_managed_children_die_with_their_parent_and_pods_with_the_owner(tmp_path: Path) -> None:
    """A service dies with its parent; a pod (not bound to its parent, podpool) survives its
    parent and dies with the cluster's owner."""
    script = tmp_path / "tree.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, sys, time
            from pathlib import Path
            from deepserve.processes import ManagedProcess, exit_with_owner

            role, out = sys.argv[1], Path(sys.argv[2])
            sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
            pod_like = [sys.executable, "-c",
                "import time; from deepserve.processes import exit_with_owner; "
                "exit_with_owner(); time.sleep(600)"]
            if role == "owner":
                service = ManagedProcess("svc", [sys.executable, __file__, "service", str(out)],
                                         out.parent / "svc.log").start()
                store = ManagedProcess("store", sleeper, out.parent / "store.log").start()
                (out.parent / "owner.json").write_text(json.dumps([service.pid, store.pid]))
            else:  # a service starting a pod, the way podpool does
                pod = ManagedProcess("pod", pod_like, out.parent / "pod.log",
                                     bind_to_parent=False).start()
                out.write_text(json.dumps([pod.pid]))
            time.sleep(600)
            """
        )
    )
    out = tmp_path / "service.json"
    owner = subprocess.Popen([sys.executable, str(script), "owner", str(out)], cwd=ROOT)
    try:
        [pod] = json.loads(wait_file(out, owner, 60))
        service, store = json.loads((tmp_path / "owner.json").read_text())
        time.sleep(1.0)  # the pod's owner watch is armed
        os.kill(service, signal.SIGKILL)  # podpool crashes: its pod must keep serving
        assert wait_gone([service]) == []
        time.sleep(1.0)
        assert alive(pod)
        owner.kill()  # the owner is SIGKILLed: no cleanup code runs
        owner.wait(10)
        assert wait_gone([pod, store]) == []
    finally:
        if owner.poll() is None:
            owner.kill()


def test_a_sigkilled_deepserve_up_leaves_no_process(tmp_path: Path) -> None:
    with local_cluster(tmp_path / "up", extra_args=("--pod-start", "zygote")) as cluster:

        async def pod_pids() -> list[int]:
            async with EtcdStore(cluster.layout.etcd_endpoint) as etcd:
                for _ in range(300):
                    found, _ = await records.pods(etcd).list()
                    if found:
                        return [p.record.pid for p in found]
                    await asyncio.sleep(0.1)
            return []

        pods = asyncio.run(pod_pids())
        assert pods, "no pod registered"
        tree = descendants(cluster.process.pid)
        pids = sorted({*tree, *pods, *cluster.pids().values()})
        cluster.process.kill()
        cluster.process.wait(10)
        assert wait_gone(pids) == [], "left running: " + ", ".join(
            Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ")[:80] for p in pids if alive(p)
        )
