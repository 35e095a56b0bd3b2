"""The gateway's Fine-tuning and Batch APIs with jobmgr as the writer of jobs: every call goes
through a real JobManagerService (the harness's `platform_apis`), with real API keys deciding
the tenant. OpenAI shapes, errors naming the field, tenant privacy, progress as the
controllers write it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from deepserve.jobs.fine_tuning import Checkpoint, Stage, StepMetric
from deepserve.jobs.records import JobPhase, JobRecord
from deepserve.jobs.store import JobStore
from deepserve.tokenizer import Tokenizer
from tests.unit.gateway.conftest import GatewayHarness, running_harness
from tests.unit.jobmgr.api_server import batch_file, chat_file

pytestmark = pytest.mark.timeout(60)


@pytest_asyncio.fixture(scope="module")
async def platform(
    etcd_endpoint: str, redis_url: str, smollm_tokenizer: Tokenizer
) -> AsyncIterator[GatewayHarness]:
    async with running_harness(etcd_endpoint, redis_url, smollm_tokenizer, platform_apis=True) as h:
        yield h


@pytest_asyncio.fixture
async def client(platform: GatewayHarness) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a fresh tenant."""
    _, key = await platform.new_key()
    headers = {"authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=platform.http_url, headers=headers, timeout=30) as c:
        yield c


async def upload(client: httpx.AsyncClient, data: bytes, purpose: str) -> str:
    reply = await client.post(
        "/v1/files", files={"file": ("f.jsonl", data)}, data={"purpose": purpose}
    )
    assert reply.status_code == 200, reply.text
    return str(reply.json()["id"])


async def create_fine_tuning(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    if "training_file" not in body:
        body["training_file"] = await upload(client, chat_file(4), "fine-tune")
    return await client.post("/v1/fine_tuning/jobs", json={"model": "m", **body})


async def test_fine_tuning_job_as_the_controller_moves_it(
    platform: GatewayHarness, client: httpx.AsyncClient
) -> None:
    reply = await create_fine_tuning(
        client, suffix="zorb", metadata={"team": "a"}, hyperparameters={"n_epochs": 2}
    )
    assert reply.status_code == 200, reply.text
    job = reply.json()
    assert job["object"] == "fine_tuning.job" and job["id"].startswith("ftjob-")
    assert job["status"] == "queued" and job["metadata"] == {"team": "a"}
    assert job["hyperparameters"] == {
        "n_epochs": 2,
        "batch_size": 4,
        "learning_rate_multiplier": 1.0,
    }
    job_id = job["id"]
    assert (await client.get(f"/v1/fine_tuning/jobs/{job_id}")).json() == job
    listed = (await client.get("/v1/fine_tuning/jobs")).json()
    assert [j["id"] for j in listed["data"]] == [job_id]

    # What jobmgr's fine-tuning controller writes while training (jobmgr is its one writer).
    def training(record: JobRecord) -> JobRecord:
        assert record.fine_tuning is not None
        progress = record.fine_tuning.progress
        record.status.phase = JobPhase.RUNNING
        progress.stage, progress.total_steps, progress.trained_tokens = Stage.TRAIN, 4, 99
        progress.add_metric(StepMetric(step=1, train_loss=1.25))
        progress.checkpoints.append(Checkpoint(step=1, artifact="ckpt-1", train_loss=1.25))
        record.record_event("TrainingStep", "Step 1/4: training loss=1.2500")
        return record

    await JobStore(platform.etcd).update(job_id, training)
    running = (await client.get(f"/v1/fine_tuning/jobs/{job_id}")).json()
    assert running["status"] == "running" and running["trained_tokens"] == 99
    events = (await client.get(f"/v1/fine_tuning/jobs/{job_id}/events")).json()["data"]
    assert events[0]["type"] == "metrics"
    assert events[0]["data"] == {"step": 1, "train_loss": 1.25, "total_steps": 4}
    checkpoints = (await client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints")).json()
    assert [c["step_number"] for c in checkpoints["data"]] == [1]
    assert checkpoints["data"][0]["fine_tuned_model_checkpoint"].startswith("ft:m:zorb:")
    cancelled = await client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"hyperparameters": {"n_epochs": "lots"}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"n_epochs": 99}}, "hyperparameters.n_epochs"),
        ({"suffix": "no spaces"}, "suffix"),
        ({"training_file": "file-missing"}, "training_file"),
        ({"validation_file": "file-missing"}, "validation_file"),
        ({"purpose": "batch"}, "training_file"),
    ],
)
async def test_fine_tuning_errors_name_the_field(
    client: httpx.AsyncClient, body: dict[str, Any], param: str
) -> None:
    if body.pop("purpose", None) == "batch":
        body["training_file"] = await upload(client, batch_file(1), "batch")
    reply = await create_fine_tuning(client, **body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param
    assert (await client.get("/v1/fine_tuning/jobs")).json()["data"] == []


async def test_batch_create_and_cancel(client: httpx.AsyncClient) -> None:
    file_id = await upload(client, batch_file(3), "batch")
    body = {
        "input_file_id": file_id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    created = (await client.post("/v1/batches", json=body)).json()
    assert created["status"] == "validating" and created["request_counts"]["total"] == 3
    cancelling = (await client.post(f"/v1/batches/{created['id']}/cancel")).json()
    assert cancelling["status"] == "cancelling" and cancelling["cancelling_at"]


async def test_jobs_are_private_to_their_tenant(
    platform: GatewayHarness, client: httpx.AsyncClient
) -> None:
    ft = (await create_fine_tuning(client)).json()["id"]
    file_id = await upload(client, batch_file(1), "batch")
    body = {
        "input_file_id": file_id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    batch = (await client.post("/v1/batches", json=body)).json()["id"]
    _, key = await platform.new_key()
    async with httpx.AsyncClient(
        base_url=platform.http_url, headers={"authorization": f"Bearer {key}"}, timeout=30
    ) as other:
        for method, path, param in (
            ("GET", f"/v1/fine_tuning/jobs/{ft}", "fine_tuning_job_id"),
            ("GET", f"/v1/fine_tuning/jobs/{ft}/events", "fine_tuning_job_id"),
            ("POST", f"/v1/fine_tuning/jobs/{ft}/cancel", "fine_tuning_job_id"),
            ("GET", f"/v1/batches/{batch}", "batch_id"),
            ("POST", f"/v1/batches/{batch}/cancel", "batch_id"),
            # A job of the other kind is as missing as one of another tenant.
            ("GET", f"/v1/batches/{ft}", "batch_id"),
        ):
            client_of = other if "batches/ft" not in path else client
            reply = await client_of.request(method, path)
            assert reply.status_code == 404, (path, reply.text)
            assert reply.json()["error"]["param"] == param
        assert (await other.get("/v1/fine_tuning/jobs")).json()["data"] == []
        assert (await other.get("/v1/batches")).json()["data"] == []
    still = (await client.get(f"/v1/fine_tuning/jobs/{ft}")).json()
    assert still["status"] == "queued"
    assert (await client.get(f"/v1/batches/{batch}")).json()["status"] == "validating"
