"""The gateway's non-inference OpenAI routes (files, fine-tuning, batches) and what they need."""

from __future__ import annotations

import functools

from deepserve.config import CommonSettings
from deepserve.files import FileService, LocalFileStore
from deepserve.gateway.adapters_api import adapters_router
from deepserve.gateway.batches_api import batches_router
from deepserve.gateway.files_api import files_router
from deepserve.gateway.fine_tuning_api import fine_tuning_router
from deepserve.gateway.http_app import RouterFactory
from deepserve.jobs.client import JobManagerClient
from deepserve.store.etcd import EtcdStore


def file_service(etcd: EtcdStore, common: CommonSettings) -> FileService:
    return FileService(etcd, LocalFileStore(common.files_root), max_bytes=common.files_max_bytes)


def platform_routers(
    etcd: EtcdStore, common: CommonSettings, jobs: JobManagerClient
) -> list[RouterFactory]:
    """Router factories for http_app.create_app: Files, Adapters, Fine-tuning and Batch APIs.
    Jobs and adapter records go through jobmgr's API (`jobs`); files are the gateway's own."""
    files = file_service(etcd, common)
    adapters_root = LocalFileStore(common.files_root).root / "adapters"
    return [
        functools.partial(files_router, files),
        functools.partial(adapters_router, jobs, adapters_root, common.files_max_bytes),
        functools.partial(fine_tuning_router, jobs),
        functools.partial(batches_router, jobs),
    ]
