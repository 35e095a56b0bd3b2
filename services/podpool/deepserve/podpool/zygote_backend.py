"""A local pod backend whose pods are forked from a zygote (`deepserve.flowserve.pod.zygote`).

Same pods as the process backend (same environment, log per pod, same registration), started
in milliseconds instead of seconds and sharing the zygote's imported runtime in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time

from deepserve.errors import Unavailable
from deepserve.podpool.local_backend import LocalProcessBackend, openmp_env
from deepserve.podpool.settings import PodPoolSettings
from deepserve.processes import bound_to_parent, with_owner
from deepserve.records import PodRecord

log = logging.getLogger(__name__)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ZygoteBackend(LocalProcessBackend):
    """Forks pods from one pre-imported zygote process on this host."""

    name = "local"

    def __init__(self, settings: PodPoolSettings, start_timeout_s: float = 120.0) -> None:
        super().__init__(settings)
        self._start_timeout_s = start_timeout_s
        self._zygote: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._pids: dict[str, int] = {}

    async def _ensure_zygote(self) -> asyncio.subprocess.Process:
        if self._zygote is not None and self._zygote.returncode is None:
            return self._zygote
        # The zygote loads libgomp (with torch) for all its children: its settings go here.
        env = with_owner({**os.environ, "PYTHONUNBUFFERED": "1", **openmp_env(self._settings)})
        self._log_dir.mkdir(parents=True, exist_ok=True)
        stderr = (self._log_dir / "zygote.log").open("ab")
        # The zygote dies with podpool (its stdin closes too); the pods it forked do not.
        proc = await asyncio.create_subprocess_exec(
            *bound_to_parent([sys.executable, "-m", "deepserve.flowserve.pod.zygote"]),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr, env=env,
        )  # fmt: skip
        stderr.close()
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), self._start_timeout_s)
        if not line or not json.loads(line).get("ready"):
            raise Unavailable("the pod zygote did not start (see zygote.log)")
        self._zygote = proc
        log.info("pod zygote ready", extra={"fields": {"pid": proc.pid}})
        return proc

    async def prepare(self) -> None:
        """Starts the zygote now, so the first pod forks at once."""
        async with self._lock:
            await self._ensure_zygote()

    async def create_pod(self, pod_id: str) -> None:
        async with self._lock:  # one command and its reply at a time
            zygote = await self._ensure_zygote()
            assert zygote.stdin is not None and zygote.stdout is not None
            command = {
                "pod_id": pod_id,
                "env": self.pod_env(pod_id),
                "log": str(self.log_path(pod_id)),
            }
            zygote.stdin.write((json.dumps(command) + "\n").encode())
            await zygote.stdin.drain()
            reply = json.loads(await asyncio.wait_for(zygote.stdout.readline(), 30))
        self._pids[pod_id] = int(reply["pid"])
        log.info("pod forked", extra={"fields": {"pod_id": pod_id, "pid": reply["pid"]}})

    def is_starting(self, pod_id: str) -> bool:
        pid = self._pids.get(pod_id)
        return pid is not None and _alive(pid)

    def started_here(self, pod_id: str) -> bool:
        return pod_id in self._pids

    def started(self) -> list[str]:
        return list(self._pids)

    async def delete_pod(self, pod: PodRecord) -> None:
        pid = self._pids.pop(pod.pod_id, None) or (pod.pid if pod.pid > 0 else None)
        if pid is None:
            return
        await asyncio.to_thread(_stop, pid, 10.0)
        log.info("pod ended", extra={"fields": {"pod_id": pod.pod_id}})

    def reap(self) -> list[str]:
        gone = [pod_id for pod_id, pid in self._pids.items() if not _alive(pid)]
        for pod_id in gone:
            del self._pids[pod_id]
        return gone

    async def close(self) -> None:
        pids, self._pids = list(self._pids.values()), {}
        await asyncio.gather(*(asyncio.to_thread(_stop, pid, 10.0) for pid in pids))
        if self._zygote is not None and self._zygote.returncode is None:
            if self._zygote.stdin is not None:
                self._zygote.stdin.close()
            with contextlib.suppress(ProcessLookupError):
                self._zygote.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._zygote.wait(), 10)


def _stop(pid: int, grace_s: float) -> None:
    """SIGTERM the pod's process group, SIGKILL it after the grace period."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
