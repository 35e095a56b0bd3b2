"""The /v1/batches routes over real etcd: OpenAI shapes, validation errors, list paging, cancel."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from deepserve.completions.openai_errors import body_for
from deepserve.errors import DeepServeError
from deepserve.files import FileService, LocalFileStore
from deepserve.gateway.auth import Caller
from deepserve.gateway.batches_api import batches_router
from deepserve.gateway.files_api import files_router
from deepserve.jobs.records import JobPhase, JobRecord
from deepserve.jobs.store import JobStore
from deepserve.store.etcd import EtcdStore
from deepserve.tenancy.tenants import TenantLimits

pytestmark = pytest.mark.timeout(60)


def batch_file(n: int) -> bytes:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    return "".join(
        json.dumps(
            {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        )
        + "\n"
        for i in range(n)
    ).encode()


@pytest_asyncio.fixture
async def api(
    etcd_endpoint: str, tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, JobStore]]:
    tenant = f"t-{uuid.uuid4().hex[:6]}"

    async def caller() -> Caller:
        return Caller(tenant, TenantLimits())

    async with EtcdStore(etcd_endpoint) as etcd:
        files = FileService(etcd, LocalFileStore(tmp_path), max_bytes=1 << 20)
        app = FastAPI()

        @app.exception_handler(DeepServeError)
        async def domain_error(_request: object, exc: DeepServeError) -> JSONResponse:
            status, body = body_for(exc)
            return JSONResponse(body, status_code=status)

        app.include_router(files_router(files, caller))
        app.include_router(batches_router(etcd, files, caller))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client, JobStore(etcd)


async def upload(client: httpx.AsyncClient, data: bytes, purpose: str) -> str:
    reply = await client.post(
        "/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": purpose}
    )
    assert reply.status_code == 200, reply.text
    return str(reply.json()["id"])


async def test_create_retrieve_list_and_cancel(api: tuple[httpx.AsyncClient, JobStore]) -> None:
    client, jobs = api
    file_id = await upload(client, batch_file(5), "batch")
    created = []
    for i in range(3):
        reply = await client.post(
            "/v1/batches",
            json={
                "input_file_id": file_id,
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
                "metadata": {"n": str(i)},
            },
        )
        assert reply.status_code == 200, reply.text
        created.append(reply.json())
    first = created[0]
    assert first["object"] == "batch" and first["id"].startswith("batch_")
    assert first["status"] == "validating" and first["input_file_id"] == file_id
    assert first["request_counts"] == {"total": 5, "completed": 0, "failed": 0}
    assert first["expires_at"] - first["created_at"] == 24 * 3600
    assert first["metadata"] == {"n": "0"} and first["output_file_id"] is None
    got = (await client.get(f"/v1/batches/{first['id']}")).json()
    assert got["id"] == first["id"]
    page = (await client.get("/v1/batches", params={"limit": 2})).json()
    ids = [b["id"] for b in page["data"]]
    assert len(ids) == 2 and page["has_more"] is True
    rest = (await client.get("/v1/batches", params={"after": ids[-1]})).json()
    assert {*ids, *(b["id"] for b in rest["data"])} == {b["id"] for b in created}
    cancelled = (await client.post(f"/v1/batches/{first['id']}/cancel")).json()
    assert cancelled["status"] == "cancelling" and cancelled["cancelling_at"] is not None
    again = await client.post(f"/v1/batches/{first['id']}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelling"

    def finish(job: JobRecord) -> JobRecord:
        job.status.phase = JobPhase.SUCCEEDED
        return job

    await jobs.update(created[1]["id"], finish)
    refused = await client.post(f"/v1/batches/{created[1]['id']}/cancel")
    assert refused.status_code == 400 and "completed" in refused.json()["error"]["message"]
    assert (await client.get("/v1/batches/batch_nope")).status_code == 404


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"completion_window": "1h"}, "completion_window"),
        ({"endpoint": "/v1/embeddings"}, "endpoint"),
        ({"input_file_id": "file-missing"}, "input_file_id"),
        ({"purpose": "fine-tune"}, "input_file_id"),
    ],
)
async def test_validation_errors_name_the_field(
    api: tuple[httpx.AsyncClient, JobStore], change: dict[str, str], param: str
) -> None:
    client, _ = api
    if change.get("purpose") == "fine-tune":
        line = {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
        }
        file_id = await upload(client, (json.dumps(line) + "\n").encode(), "fine-tune")
        change = {}
    else:
        file_id = await upload(client, batch_file(1), "batch")
    body = {
        "input_file_id": file_id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    body.update(change)
    reply = await client.post("/v1/batches", json=body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param
