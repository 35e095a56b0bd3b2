"""OpenAI Files API routes: upload, list, retrieve, content, delete (tenant-scoped)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, File, Form, UploadFile
from fastapi.responses import Response

from deepserve.errors import InvalidArgument
from deepserve.files import FileService
from deepserve.gateway.auth import Caller

CallerDependency = Callable[..., Awaitable[Caller]]


def files_router(files: FileService, caller: CallerDependency) -> APIRouter:
    """The /v1/files routes over a FileService; `caller` authenticates like the other routes."""
    router = APIRouter()

    @router.post("/v1/files")
    async def upload_file(
        file: UploadFile = File(...),
        purpose: str = Form(...),
        who: Caller = Depends(caller),
    ) -> dict[str, Any]:
        # Read one byte past the limit so an oversized upload is refused without reading it all.
        data = await file.read(files.max_bytes + 1)
        if len(data) > files.max_bytes:
            raise InvalidArgument(
                f"the file exceeds the limit of {files.max_bytes} bytes", field="file"
            )
        record = await files.upload(
            data, filename=file.filename or "upload.jsonl", purpose=purpose, tenant=who.tenant
        )
        return record.openai()

    @router.get("/v1/files")
    async def list_files(
        purpose: str | None = None, who: Caller = Depends(caller)
    ) -> dict[str, Any]:
        found = await files.list(who.tenant, purpose)
        return {"object": "list", "data": [f.openai() for f in found], "has_more": False}

    @router.get("/v1/files/{file_id}")
    async def retrieve_file(file_id: str, who: Caller = Depends(caller)) -> dict[str, Any]:
        return (await files.get(file_id, who.tenant)).openai()

    @router.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str, who: Caller = Depends(caller)) -> Response:
        data = await files.content(file_id, who.tenant)
        return Response(data, media_type="application/octet-stream")

    @router.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str, who: Caller = Depends(caller)) -> dict[str, Any]:
        record = await files.delete(file_id, who.tenant)
        return {"id": record.file_id, "object": "file", "deleted": True}

    return router
