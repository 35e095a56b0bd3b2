"""The gateway's non-inference OpenAI routes (files, fine-tuning, batches) and what they need."""

from __future__ import annotations

import functools

from deepserve.config import CommonSettings
from deepserve.files import FileService, LocalFileStore
from deepserve.gateway.batches_api import batches_router
from deepserve.gateway.files_api import files_router
from deepserve.gateway.fine_tuning_api import fine_tuning_router
from deepserve.gateway.http_app import RouterFactory
from deepserve.store.etcd import EtcdStore


def file_service(etcd: EtcdStore, common: CommonSettings) -> FileService:
    return FileService(etcd, LocalFileStore(common.files_root), max_bytes=common.files_max_bytes)


def platform_routers(etcd: EtcdStore, common: CommonSettings) -> list[RouterFactory]:
    """Router factories for http_app.create_app: Files, Fine-tuning and Batch APIs."""
    files = file_service(etcd, common)
    return [
        functools.partial(files_router, files),
        functools.partial(fine_tuning_router, etcd, files),
        functools.partial(batches_router, etcd, files),
    ]
