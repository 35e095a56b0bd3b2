"""The /v1/batches routes through a real jobmgr API (servicer on a free port over the session
etcd): OpenAI shapes, validation errors naming the field, list paging, cancel, tenant scoping,
and a 503 when jobmgr cannot be reached."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
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
from deepserve.jobs.client import JobManagerClient
from deepserve.jobs.records import JobPhase, JobRecord
from deepserve.jobs.store import JobStore
from deepserve.processes import free_port
from deepserve.store.etcd import EtcdStore
from deepserve.tenancy.tenants import TenantLimits
from tests.unit.jobmgr.api_server import batch_file, chat_file, jobmgr_api

pytestmark = pytest.mark.timeout(60)


@dataclass
class BatchesApi:
    """The /v1/batches and /v1/files routes of a caller's tenant, over a real jobmgr API."""

    client: httpx.AsyncClient
    jobs: JobStore
    as_tenant: Callable[[str], httpx.AsyncClient]


def app_for(tenant: str, files: FileService, jobs: JobManagerClient) -> httpx.AsyncClient:
    async def caller() -> Caller:
        return Caller(tenant, TenantLimits())

    app = FastAPI()

    @app.exception_handler(DeepServeError)
    async def domain_error(_request: object, exc: DeepServeError) -> JSONResponse:
        status, body = body_for(exc)
        return JSONResponse(body, status_code=status)

    app.include_router(files_router(files, caller))
    app.include_router(batches_router(jobs, caller))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


@pytest_asyncio.fixture
async def api(etcd_endpoint: str, tmp_path: Path) -> AsyncIterator[BatchesApi]:
    async with EtcdStore(etcd_endpoint) as etcd:
        files = FileService(etcd, LocalFileStore(tmp_path), max_bytes=1 << 20)
        async with jobmgr_api(etcd, files) as address:
            jobs = JobManagerClient(address)
            opened: list[httpx.AsyncClient] = []

            def as_tenant(tenant: str) -> httpx.AsyncClient:
                opened.append(app_for(tenant, files, jobs))
                return opened[-1]

            try:
                yield BatchesApi(as_tenant(f"t-{uuid.uuid4().hex[:6]}"), JobStore(etcd), as_tenant)
            finally:
                for client in opened:
                    await client.aclose()
                await jobs.close()


async def upload(client: httpx.AsyncClient, data: bytes, purpose: str) -> str:
    reply = await client.post(
        "/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": purpose}
    )
    assert reply.status_code == 200, reply.text
    return str(reply.json()["id"])


async def test_create_retrieve_list_and_cancel(api: BatchesApi) -> None:
    client, jobs = api.client, api.jobs
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
    assert refused.json()["error"]["param"] == "batch_id"
    missing = await client.get("/v1/batches/batch_nope")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "batch_id"


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
    api: BatchesApi, change: dict[str, str], param: str
) -> None:
    client = api.client
    if change.get("purpose") == "fine-tune":
        file_id = await upload(client, chat_file(1), "fine-tune")
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


async def test_another_tenants_batch_is_not_found(api: BatchesApi) -> None:
    file_id = await upload(api.client, batch_file(2), "batch")
    body = {
        "input_file_id": file_id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    mine = (await api.client.post("/v1/batches", json=body)).json()["id"]
    other = api.as_tenant(f"t-{uuid.uuid4().hex[:6]}")
    for reply in (
        await other.get(f"/v1/batches/{mine}"),
        await other.post(f"/v1/batches/{mine}/cancel"),
    ):
        assert reply.status_code == 404, reply.text
        assert reply.json()["error"]["param"] == "batch_id"
    assert (await other.get("/v1/batches")).json()["data"] == []
    # The other tenant cannot start a batch over this tenant's file either.
    refused = await other.post("/v1/batches", json=body)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "input_file_id"
    record = (await api.jobs.get(mine)).record
    assert record.batch is not None and not record.batch.progress.cancel_requested


async def test_unreachable_jobmgr_is_a_503(etcd_endpoint: str, tmp_path: Path) -> None:
    async with EtcdStore(etcd_endpoint) as etcd:
        files = FileService(etcd, LocalFileStore(tmp_path), max_bytes=1 << 20)
        jobs = JobManagerClient(f"127.0.0.1:{free_port()}", timeout_s=5)
        async with app_for("t", files, jobs) as client:
            reply = await client.get("/v1/batches")
        await jobs.close()
    assert reply.status_code == 503, reply.text
    assert reply.json()["error"]["type"] == "service_unavailable"
