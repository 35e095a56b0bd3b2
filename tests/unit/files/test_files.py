"""Files: JSONL validation per purpose, the content-addressed store, the service and its routes."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from deepserve.completions.openai_errors import body_for
from deepserve.errors import DeepServeError, InvalidArgument, NotFound
from deepserve.files import FilePurpose, FileService, LocalFileStore, validate_jsonl
from deepserve.gateway.auth import Caller
from deepserve.gateway.files_api import files_router
from deepserve.store.etcd import EtcdStore
from deepserve.tenancy.tenants import TenantLimits

pytestmark = pytest.mark.timeout(60)


def chat_line(question: str, answer: str) -> str:
    return json.dumps(
        {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
        }
    )


def batch_line(custom_id: str, url: str = "/v1/chat/completions") -> str:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def test_fine_tune_lines_are_counted() -> None:
    data = "\n".join([chat_line("a", "b"), "", chat_line("c", "d")]).encode()
    assert validate_jsonl(FilePurpose.FINE_TUNE, data) == 2


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([chat_line("a", "b"), "{not json"], "line 2: not valid JSON"),
        ([chat_line("a", "b"), json.dumps({"prompt": "x"})], "line 2: missing 'messages'"),
        ([json.dumps({"messages": [{"role": "user", "content": "x"}]})], "line 1: no assistant"),
        (
            [json.dumps({"messages": [{"role": "bot", "content": "x"}]})],
            r"line 1: messages\[0\]\.role",
        ),
        ([json.dumps([1, 2])], "line 1: expected a JSON object"),
        ([], "holds no records"),
    ],
)
def test_bad_fine_tune_file_names_the_line(lines: list[str], expected: str) -> None:
    with pytest.raises(InvalidArgument, match=expected):
        validate_jsonl(FilePurpose.FINE_TUNE, "\n".join(lines).encode())


def test_batch_lines_are_checked() -> None:
    assert validate_jsonl(FilePurpose.BATCH, (batch_line("a") + "\n" + batch_line("b")).encode())
    with pytest.raises(InvalidArgument, match="line 2: duplicate custom_id 'a'"):
        validate_jsonl(FilePurpose.BATCH, (batch_line("a") + "\n" + batch_line("a")).encode())
    with pytest.raises(InvalidArgument, match="line 1: 'url'"):
        validate_jsonl(FilePurpose.BATCH, batch_line("a", "/v1/embeddings").encode())


def test_not_utf8_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="not UTF-8"):
        validate_jsonl(FilePurpose.BATCH, b"\xff\xfe")


def test_local_store_is_content_addressed(tmp_path: Path) -> None:
    store = LocalFileStore(tmp_path)
    first = store.put_blob(b"same")
    assert store.put_blob(b"same") == first
    assert store.get_blob(first) == b"same"
    store.delete_blob(first)
    with pytest.raises(NotFound):
        store.get_blob(first)
    store.put_artifact("jobs/j1/ckpt.pt", b"x")
    assert store.has_artifact("jobs/j1/ckpt.pt")
    store.delete_artifacts("jobs/j1")
    assert not store.has_artifact("jobs/j1/ckpt.pt")
    with pytest.raises(InvalidArgument):
        store.artifact_path("../escape")


@pytest_asyncio.fixture
async def files(etcd_endpoint: str, tmp_path: Path) -> AsyncIterator[FileService]:
    async with EtcdStore(etcd_endpoint) as etcd:
        yield FileService(etcd, LocalFileStore(tmp_path), max_bytes=4096)


async def test_service_round_trip_is_tenant_scoped(files: FileService) -> None:
    tenant, other = f"t-{uuid.uuid4().hex[:6]}", f"t-{uuid.uuid4().hex[:6]}"
    # Unique bytes: the blob store is content-addressed and other tests upload lines too.
    data = (chat_line(f"q {uuid.uuid4().hex}", "a") + "\n").encode()
    first = await files.upload(data, filename="a.jsonl", purpose="fine-tune", tenant=tenant)
    second = await files.upload(data, filename="b.jsonl", purpose="fine-tune", tenant=tenant)
    assert first.sha256 == second.sha256 and first.lines == 1
    assert {f.file_id for f in await files.list(tenant)} == {first.file_id, second.file_id}
    assert await files.content(first.file_id, tenant) == data
    with pytest.raises(NotFound):
        await files.get(first.file_id, other)
    await files.delete(first.file_id, tenant)
    # The other file shares the blob, so its bytes survive the first delete.
    assert await files.content(second.file_id, tenant) == data
    await files.delete(second.file_id, tenant)
    with pytest.raises(NotFound):
        files.blobs.get_blob(second.sha256)
    with pytest.raises(InvalidArgument, match="purpose"):
        await files.upload(data, filename="c", purpose="assistants", tenant=tenant)
    with pytest.raises(InvalidArgument, match="limit"):
        await files.upload(b"x" * 5000, filename="c", purpose="batch", tenant=tenant)


async def test_routes_speak_openai_shapes(files: FileService) -> None:
    tenant = f"t-{uuid.uuid4().hex[:6]}"

    async def caller() -> Caller:
        return Caller(tenant, TenantLimits())

    app = FastAPI()

    @app.exception_handler(DeepServeError)
    async def domain_error(_request: object, exc: DeepServeError) -> httpx.Response:
        from fastapi.responses import JSONResponse

        status, body = body_for(exc)
        return JSONResponse(body, status_code=status)

    app.include_router(files_router(files, caller))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        data = (batch_line("x") + "\n").encode()
        reply = await client.post(
            "/v1/files", files={"file": ("b.jsonl", data)}, data={"purpose": "batch"}
        )
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["object"] == "file" and body["bytes"] == len(data)
        assert body["purpose"] == "batch" and body["filename"] == "b.jsonl"
        listed = (await client.get("/v1/files")).json()
        assert [f["id"] for f in listed["data"]] == [body["id"]]
        assert (await client.get(f"/v1/files/{body['id']}/content")).content == data
        bad = await client.post(
            "/v1/files", files={"file": ("b.jsonl", b"{}\n")}, data={"purpose": "batch"}
        )
        assert bad.status_code == 400 and "line 1" in bad.json()["error"]["message"]
        gone = await client.delete(f"/v1/files/{body['id']}")
        assert gone.json() == {"id": body["id"], "object": "file", "deleted": True}
        assert (await client.get(f"/v1/files/{body['id']}")).status_code == 404
