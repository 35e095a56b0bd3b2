"""The local pod backend: each pod is a `python -m deepserve.flowserve` process on this host."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

from deepserve.podpool.settings import PodPoolSettings
from deepserve.processes import ManagedProcess, with_owner
from deepserve.records import PodRecord

log = logging.getLogger(__name__)


def openmp_env(settings: PodPoolSettings) -> dict[str, str]:
    """OpenMP settings for a pod's environment (read once, when torch loads libgomp)."""
    if settings.pod_openmp_spin_count < 0 or {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & set(
        os.environ
    ):
        return {}
    return {"GOMP_SPINCOUNT": str(settings.pod_openmp_spin_count)}


class LocalProcessBackend:
    """Starts pods as child processes (own process group, log file per pod) and ends them."""

    name = "local"

    def __init__(self, settings: PodPoolSettings) -> None:
        self._settings = settings
        self._log_dir = settings.pod_log_dir or Path(tempfile.mkdtemp(prefix="deepserve-pods-"))
        self._procs: dict[str, ManagedProcess] = {}
        self._host = settings.common.host_name

    def pod_env(self, pod_id: str) -> dict[str, str]:
        common = self._settings.common
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "DEEPSERVE_ETCD_ENDPOINT": common.etcd_endpoint,
            "DEEPSERVE_REDIS_URL": common.redis_url,
            "DEEPSERVE_HOST": common.host,
            "DEEPSERVE_HOST_NAME": common.host_name,
            "DEEPSERVE_LEASE_TTL_S": str(common.lease_ttl_s),
            "DEEPSERVE_LOG_LEVEL": common.log_level,
            "DEEPSERVE_FLOWSERVE_POD_ID": pod_id,
            # A pool pod takes any free port and advertises it in its pod record.
            "DEEPSERVE_FLOWSERVE_GRPC_PORT": "0",
            # Warm: the runtime starts, the model comes later through LoadModel.
            "DEEPSERVE_FLOWSERVE_MODEL": "",
        }
        env = with_owner(env)
        if self._settings.pod_device:
            env["DEEPSERVE_FLOWSERVE_DEVICE"] = self._settings.pod_device
        # The pods map the DRAM copies this pool keeps (and publish what they fork) here.
        if self._settings.weights_cache_dir is not None:
            env["DEEPSERVE_FLOWSERVE_WEIGHTS_CACHE_DIR"] = str(self._settings.weights_cache_dir)
        else:
            env["DEEPSERVE_FLOWSERVE_USE_WEIGHTS_CACHE"] = "false"
        if common.telemetry_dir is not None:
            env["DEEPSERVE_TELEMETRY_DIR"] = str(common.telemetry_dir)
        env.update(openmp_env(self._settings))
        if self._settings.pod_threads > 0:
            env["DEEPSERVE_FLOWSERVE_THREADS"] = str(self._settings.pod_threads)
        if self._settings.dram_models:
            # Models likely to scale: their pods load the tokenizer before being asked.
            env["DEEPSERVE_FLOWSERVE_PRELOAD_TOKENIZERS"] = self._settings.dram_models
        return env

    def check_model(self, model: str) -> None:
        # Pods of this backend share this host's files: a catalog name must be pulled already
        # (pods never download), a path must hold a model.
        from deepserve.models.catalog import default_cache_dir, resolve_model

        resolve_model(model, default_cache_dir())

    async def prepare(self) -> None:
        """Readies pod starts ahead of the first (nothing to do for plain processes)."""

    async def create_pod(self, pod_id: str) -> None:
        proc = ManagedProcess(
            pod_id,
            [sys.executable, "-m", "deepserve.flowserve"],
            self._log_dir / f"{pod_id}.log",
            env=self.pod_env(pod_id),
            # A pod outlives a podpool crash (the next podpool adopts it from etcd); it ends
            # with the cluster's owner instead (deepserve.processes).
            bind_to_parent=False,
        )
        await asyncio.to_thread(proc.start)
        self._procs[pod_id] = proc
        log.info("pod process started", extra={"fields": {"pod_id": pod_id, "pid": proc.pid}})

    def is_starting(self, pod_id: str) -> bool:
        proc = self._procs.get(pod_id)
        return proc is not None and proc.alive()

    def started_here(self, pod_id: str) -> bool:
        return pod_id in self._procs

    def started(self) -> list[str]:
        """Ids of the pods this backend started and has not seen end."""
        return list(self._procs)

    def log_path(self, pod_id: str) -> Path:
        return self._log_dir / f"{pod_id}.log"

    async def delete_pod(self, pod: PodRecord) -> None:
        proc = self._procs.pop(pod.pod_id, None)
        if proc is not None:
            await asyncio.to_thread(proc.stop, 10.0)
        elif pod.backend == self.name and pod.host == self._host and pod.pid > 0:
            # Started by another process on this host (e.g. `deepserve up`'s first pod).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pod.pid, signal.SIGTERM)
        log.info("pod ended", extra={"fields": {"pod_id": pod.pod_id}})

    def warm_unevenly_spread(self) -> bool:
        return False  # one host: nothing to spread

    def reap(self) -> list[str]:
        """Drops handles of processes that exited; returns their pod ids."""
        gone = [pod_id for pod_id, proc in self._procs.items() if not proc.alive()]
        for pod_id in gone:
            del self._procs[pod_id]
        return gone

    async def close(self) -> None:
        procs, self._procs = list(self._procs.values()), {}
        await asyncio.gather(*(asyncio.to_thread(p.stop, 10.0) for p in procs))
