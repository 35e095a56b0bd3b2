"""LoRA adapter routes: register (upload PEFT files), list and delete a tenant's adapters.

The gateway stores an upload's files under the files root (`adapters/<tenant>/...`, a directory
every instance must be able to read) and asks jobmgr, the records' one writer, to register it;
jobmgr checks it against its base model (rank limit, shapes, files) and refuses with the reason
and the field. A registered adapter is used by naming it as a request's `model`.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, File, Form, UploadFile

from deepserve.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE
from deepserve.adapters.records import AdapterRecord
from deepserve.errors import DeepServeError, InvalidArgument
from deepserve.gateway.auth import Caller
from deepserve.jobs.client import JobManagerClient

CallerDependency = Callable[..., Awaitable[Caller]]
# Also a directory name under the files root: no separators, no leading dot.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,199}")


def adapter_json(record: AdapterRecord) -> dict[str, Any]:
    return {
        "id": record.name,
        "object": "adapter",
        "base_model": record.base_model,
        "rank": record.rank,
        "source": record.source,
        "created": int(record.created_at),
        "owned_by": record.tenant,
    }


async def _save(upload: UploadFile, target: Path, max_bytes: int, field: str) -> None:
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InvalidArgument(f"the file exceeds the limit of {max_bytes} bytes", field=field)
    await asyncio.to_thread(target.write_bytes, data)


def adapters_router(
    jobs: JobManagerClient, root: Path, max_bytes: int, caller: CallerDependency
) -> APIRouter:
    """The /v1/adapters routes; uploads are written under `root`."""
    router = APIRouter()

    @router.post("/v1/adapters")
    async def register_adapter(
        name: str = Form(...),
        model: str = Form(...),
        adapter_config: UploadFile = File(...),
        adapter_model: UploadFile = File(...),
        who: Caller = Depends(caller),
    ) -> dict[str, Any]:
        if not _NAME.fullmatch(name):
            raise InvalidArgument(
                "an adapter name is up to 200 letters, digits, '.', '_', ':' or '-'",
                field="name",
            )
        directory = root / who.tenant / f"{name}-{uuid.uuid4().hex[:12]}"
        await asyncio.to_thread(directory.mkdir, parents=True)
        try:
            await _save(adapter_config, directory / CONFIG_FILE, max_bytes, "adapter_config")
            await _save(adapter_model, directory / WEIGHTS_FILE, max_bytes, "adapter_model")
            record = await jobs.register_adapter(
                AdapterRecord(
                    name=name,
                    tenant=who.tenant,
                    base_model=model,
                    path=str(directory),
                    rank=0,
                    source="upload",
                )
            )
        except DeepServeError as exc:
            shutil.rmtree(directory, ignore_errors=True)
            if exc.field == "base_model":
                exc.field = "model"  # the form field that named the base
            raise
        return adapter_json(record)

    @router.get("/v1/adapters")
    async def list_adapters(who: Caller = Depends(caller)) -> dict[str, Any]:
        found = await jobs.list_adapters(who.tenant)
        return {"object": "list", "data": [adapter_json(a) for a in found]}

    @router.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str, who: Caller = Depends(caller)) -> dict[str, Any]:
        mine = {a.name: a for a in await jobs.list_adapters(who.tenant)}
        await jobs.delete_adapter(who.tenant, name)
        record = mine.get(name)
        if (
            record is not None
            and record.source == "upload"
            and Path(record.path).is_relative_to(root)
        ):
            shutil.rmtree(record.path, ignore_errors=True)
        return {"id": name, "object": "adapter", "deleted": True}

    return router
