"""Files: upload (validated), list, get, read, delete; bytes in a FileStore, records in etcd."""

from __future__ import annotations

import asyncio
import uuid

from deepserve.errors import InvalidArgument, NotFound
from deepserve.files.blob_store import FileStore
from deepserve.files.file_records import FilePurpose, FileRecord
from deepserve.files.validation import validate_jsonl
from deepserve.store.etcd import EtcdStore, TypedPrefix
from deepserve.store.keys import Keys

UPLOAD_PURPOSES = frozenset({FilePurpose.FINE_TUNE, FilePurpose.BATCH})


def file_records(store: EtcdStore) -> TypedPrefix[FileRecord]:
    return TypedPrefix(store, Keys.files_prefix(), FileRecord, Keys.file)


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex[:24]}"


class FileService:
    """The Files API's domain: tenant-scoped file records over a content-addressed store."""

    def __init__(self, etcd: EtcdStore, blobs: FileStore, *, max_bytes: int) -> None:
        self.records = file_records(etcd)
        self.blobs = blobs
        self.max_bytes = max_bytes

    async def upload(
        self, data: bytes, *, filename: str, purpose: str, tenant: str = ""
    ) -> FileRecord:
        """Validates then stores; `purpose` as the client sent it."""
        try:
            kind = FilePurpose(purpose)
        except ValueError:
            kind = None
        if kind not in UPLOAD_PURPOSES:
            raise InvalidArgument(
                f"purpose {purpose!r} is not supported (use 'fine-tune' or 'batch')",
                field="purpose",
            )
        assert kind is not None
        if len(data) > self.max_bytes:
            raise InvalidArgument(
                f"the file is {len(data)} bytes; the limit is {self.max_bytes}", field="file"
            )
        lines = await asyncio.to_thread(validate_jsonl, kind, data)
        return await self.store(data, filename=filename, purpose=kind, tenant=tenant, lines=lines)

    async def store(
        self, data: bytes, *, filename: str, purpose: FilePurpose, tenant: str, lines: int = 0
    ) -> FileRecord:
        """Stores bytes without validation (platform-written files such as batch output)."""
        digest = await asyncio.to_thread(self.blobs.put_blob, data)
        record = FileRecord(
            file_id=new_file_id(),
            filename=filename or "upload.jsonl",
            purpose=purpose,
            bytes=len(data),
            sha256=digest,
            tenant=tenant,
            lines=lines,
        )
        await self.records.create(record.file_id, record)
        return record

    async def get(self, file_id: str, tenant: str | None = None) -> FileRecord:
        found = await self.records.get(file_id) if file_id else None
        # Another tenant's file looks exactly like a missing one.
        if found is None or (tenant is not None and found.record.tenant != tenant):
            raise NotFound(f"No such File object: {file_id}", field="file_id")
        return found.record

    async def list(self, tenant: str | None = None, purpose: str | None = None) -> list[FileRecord]:
        found, _ = await self.records.list()
        files = [
            f.record
            for f in found
            if (tenant is None or f.record.tenant == tenant)
            and (not purpose or f.record.purpose.value == purpose)
        ]
        return sorted(files, key=lambda f: f.created_at, reverse=True)

    async def content(self, file_id: str, tenant: str | None = None) -> bytes:
        record = await self.get(file_id, tenant)
        return await asyncio.to_thread(self.blobs.get_blob, record.sha256)

    async def delete(self, file_id: str, tenant: str | None = None) -> FileRecord:
        record = await self.get(file_id, tenant)
        await self.records.delete(file_id)
        # Content-addressed: the blob goes only when no other file shares its bytes.
        others, _ = await self.records.list()
        if not any(o.record.sha256 == record.sha256 for o in others):
            await asyncio.to_thread(self.blobs.delete_blob, record.sha256)
        return record
