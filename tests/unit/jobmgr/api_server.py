"""A real JobManagerService (servicer, admission, stores) on a free port over a given etcd and
file service: what the gateway's job routes and gRPC clients talk to in unit tests. Also the
valid input files the jobs name."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

from deepserve.files import FileService
from deepserve.jobmgr.adapter_registry import AdapterRegistry
from deepserve.jobmgr.job_admission import JobAdmission
from deepserve.jobmgr.servicer import JobManagerServicer
from deepserve.jobmgr.task_store import TaskStore
from deepserve.jobs.store import JobStore
from deepserve.models.catalog import default_cache_dir
from deepserve.rpc.server import start_grpc_server
from deepserve.store.etcd import EtcdStore
from deepserve.v1 import jobmgr_pb2_grpc

SERVICE_NAME = "deepserve.v1.JobManagerService"
# The rank limit adapters registered here are held to.
MAX_LORA_RANK = 16


@contextlib.asynccontextmanager
async def jobmgr_api(
    etcd: EtcdStore, files: FileService, model_cache_dir: Path | None = None
) -> AsyncIterator[str]:
    """Serves JobManagerService (no reconcile loop) and yields its address; adapters register
    against the models of `model_cache_dir`."""
    jobs = JobStore(etcd)
    adapters = AdapterRegistry(
        etcd, model_cache_dir=model_cache_dir or default_cache_dir(), max_rank=MAX_LORA_RANK
    )
    servicer = JobManagerServicer(jobs, TaskStore(etcd), JobAdmission(jobs, files), adapters)
    service = await start_grpc_server(
        [lambda s: jobmgr_pb2_grpc.add_JobManagerServiceServicer_to_server(servicer, s)],
        [SERVICE_NAME],
        host="127.0.0.1",
        port=0,
    )
    try:
        yield f"127.0.0.1:{service.port}"
    finally:
        await service.server.stop(0)


def batch_file(n: int) -> bytes:
    """A valid batch input file of `n` chat requests."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    return "".join(
        json.dumps(
            {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        )
        + "\n"
        for i in range(n)
    ).encode()


def chat_file(n: int) -> bytes:
    """A valid fine-tuning file of `n` chat examples."""
    line = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    return (json.dumps(line) + "\n").encode() * n
