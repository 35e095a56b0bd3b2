"""JobManagerService over gRPC for fine-tuning and batch jobs, as a client sees it: CreateJob
checks (the field named in the trailers), tenant and kind scoping of Get/List/Cancel, batch
cancel semantics, and the JobManagerClient in libs. A real servicer on a free port over the
session etcd and a local file store; no reconcile loop runs."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from deepserve import records
from deepserve.errors import InvalidArgument, NotFound, Unavailable
from deepserve.files import FileService, LocalFileStore
from deepserve.jobs.batch import BatchSpec
from deepserve.jobs.client import JobManagerClient
from deepserve.jobs.records import JobKind, JobPhase, JobRecord
from deepserve.jobs.store import JobStore
from deepserve.jobs.wire import job_from_proto
from deepserve.processes import free_port
from deepserve.rpc.client import insecure_channel
from deepserve.rpc.errors import FIELD_KEY
from deepserve.store.etcd import EtcdStore
from deepserve.v1 import jobmgr_pb2 as pb
from deepserve.v1 import jobmgr_pb2_grpc

from .api_server import batch_file, chat_file, jobmgr_api

pytestmark = pytest.mark.timeout(60)


@dataclass
class Api:
    """A stub on the served API, the files it checks, and the store behind it."""

    stub: jobmgr_pb2_grpc.JobManagerServiceStub
    files: FileService
    jobs: JobStore
    address: str

    async def upload(self, data: bytes, purpose: str, tenant: str) -> str:
        record = await self.files.upload(data, filename="f.jsonl", purpose=purpose, tenant=tenant)
        return record.file_id

    async def fine_tuning(self, tenant: str, **fields: object) -> pb.Job:
        spec = pb.FineTuningSpec(**{"model": "m", "tenant": tenant, **fields})  # type: ignore[arg-type]
        if not spec.training_file:
            spec.training_file = await self.upload(chat_file(3), "fine-tune", tenant)
        request = pb.CreateJobRequest(
            spec=pb.JobSpec(kind=pb.JOB_KIND_FINE_TUNING, fine_tuning=spec)
        )
        return (await self.stub.CreateJob(request)).job

    async def batch(self, tenant: str, lines: int = 5, **fields: object) -> pb.Job:
        spec = pb.BatchSpec(tenant=tenant, **fields)  # type: ignore[arg-type]
        if not spec.input_file_id:
            spec.input_file_id = await self.upload(batch_file(lines), "batch", tenant)
        request = pb.CreateJobRequest(spec=pb.JobSpec(kind=pb.JOB_KIND_BATCH, batch=spec))
        return (await self.stub.CreateJob(request)).job


@pytest.fixture
async def api(etcd: EtcdStore, tmp_path: Path) -> AsyncIterator[Api]:
    files = FileService(etcd, LocalFileStore(tmp_path), max_bytes=1 << 20)
    async with jobmgr_api(etcd, files) as address:
        async with insecure_channel(address, traced=False) as channel:
            stub = jobmgr_pb2_grpc.JobManagerServiceStub(channel)
            yield Api(stub, files, JobStore(etcd), address)


def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def field_of(exc: grpc.aio.AioRpcError) -> str | None:
    return dict(exc.trailing_metadata() or ()).get(FIELD_KEY)


async def test_create_fine_tuning_job(api: Api) -> None:
    who = tenant()
    job = await api.fine_tuning(
        who, n_epochs=2, lora_rank=4, checkpoint_every_steps=0, metadata={"team": "a"}
    )
    assert job.job_id.startswith("ftjob-") and job.spec.kind == pb.JOB_KIND_FINE_TUNING
    assert job.status.phase == pb.JOB_PHASE_PENDING
    assert job.status.fine_tuning.stage == pb.FINE_TUNING_STAGE_PREPROCESS
    spec = job.spec.fine_tuning
    # Given values kept (a zero checkpoint interval is not the default), defaults filled.
    assert (spec.n_epochs, spec.batch_size, spec.learning_rate_multiplier) == (2, 4, 1.0)
    assert (spec.lora_rank, spec.lora_alpha) == (4, 16)
    assert spec.HasField("checkpoint_every_steps") and spec.checkpoint_every_steps == 0
    assert spec.validation_split == pytest.approx(0.1) and dict(spec.metadata) == {"team": "a"}
    stored = (await api.jobs.get(job.job_id)).record
    assert job_from_proto(job).record == stored
    got = await api.stub.GetJob(pb.GetJobRequest(job_id=job.job_id, tenant=who))
    assert job_from_proto(got.job).record == stored


async def test_create_batch_job(api: Api) -> None:
    who = tenant()
    job = await api.batch(who, lines=5, metadata={"n": "1"})
    assert job.job_id.startswith("batch_") and job.spec.kind == pb.JOB_KIND_BATCH
    spec, progress = job.spec.batch, job.status.batch
    assert spec.endpoint == "/v1/chat/completions" and spec.completion_window == "24h"
    assert spec.expires_at_unix - job.created_at_unix == pytest.approx(24 * 3600)
    assert progress.total == 5 and progress.stage == pb.BATCH_STAGE_VALIDATING
    assert not progress.HasField("cancelling_at_unix")
    record = job_from_proto(job).record
    assert record.batch is not None and record.batch.spec.metadata == {"n": "1"}
    assert record == (await api.jobs.get(job.job_id)).record


async def _other_tenants_file(api: Api, who: str) -> dict[str, object]:
    return {"training_file": await api.upload(chat_file(2), "fine-tune", tenant())}


async def _batch_purpose_file(api: Api, who: str) -> dict[str, object]:
    return {"training_file": await api.upload(batch_file(2), "batch", who)}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"n_epochs": 99}, "hyperparameters.n_epochs"),
        ({"learning_rate_multiplier": -1.0}, "hyperparameters.learning_rate_multiplier"),
        ({"model": " "}, "model"),
        ({"suffix": "no spaces allowed"}, "suffix"),
        ({"lora_rank": 0}, "lora_rank"),
        ({"validation_split": 1.5}, "validation_split"),
        ({"training_file": "file-missing"}, "training_file"),
        ({"validation_file": "file-missing"}, "validation_file"),
        (_other_tenants_file, "training_file"),
        (_batch_purpose_file, "training_file"),
    ],
)
async def test_invalid_fine_tuning_job_names_the_field(
    api: Api, fields: dict[str, object] | Callable[..., object], field: str
) -> None:
    who = tenant()
    if callable(fields):
        fields = await fields(api, who)  # type: ignore[misc]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.fine_tuning(who, **fields)  # type: ignore[arg-type]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_of(caught.value) == field
    assert not (await api.stub.ListJobs(pb.ListJobsRequest(tenant=who))).jobs


async def _fine_tune_purpose_file(api: Api, who: str) -> dict[str, object]:
    return {"input_file_id": await api.upload(chat_file(2), "fine-tune", who)}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"completion_window": "1h"}, "completion_window"),
        ({"endpoint": "/v1/embeddings"}, "endpoint"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
        ({"input_file_id": "file-missing"}, "input_file_id"),
        (_fine_tune_purpose_file, "input_file_id"),
    ],
)
async def test_invalid_batch_job_names_the_field(
    api: Api, fields: dict[str, object] | Callable[..., object], field: str
) -> None:
    who = tenant()
    if callable(fields):
        fields = await fields(api, who)  # type: ignore[misc]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.batch(who, **fields)  # type: ignore[arg-type]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_of(caught.value) == field
    assert not (await api.stub.ListJobs(pb.ListJobsRequest(tenant=who))).jobs


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (pb.JobSpec(kind=pb.JOB_KIND_BATCH, fine_tuning=pb.FineTuningSpec()), "spec.batch"),
        (pb.JobSpec(batch=pb.BatchSpec()), "spec.kind"),
    ],
)
async def test_spec_must_match_the_kind(api: Api, spec: pb.JobSpec, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.stub.CreateJob(pb.CreateJobRequest(spec=spec))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_of(caught.value) == field


async def test_jobs_are_scoped_to_their_tenant_and_kind(api: Api) -> None:
    alice, bob = tenant(), tenant()
    mine = [await api.batch(alice), await api.fine_tuning(alice)]
    theirs = [await api.batch(bob), await api.fine_tuning(bob)]

    async def listed(**kw: object) -> set[str]:
        reply = await api.stub.ListJobs(pb.ListJobsRequest(**kw))  # type: ignore[arg-type]
        return {j.job_id for j in reply.jobs}

    assert await listed(tenant=alice) == {j.job_id for j in mine}
    assert await listed(tenant=alice, kind=pb.JOB_KIND_BATCH) == {mine[0].job_id}
    assert await listed(kind=pb.JOB_KIND_FINE_TUNING) == {mine[1].job_id, theirs[1].job_id}
    assert await listed() == {j.job_id for j in mine + theirs}
    for job in theirs:
        for call, request in (
            ("GetJob", pb.GetJobRequest(job_id=job.job_id, tenant=alice)),
            ("CancelJob", pb.CancelJobRequest(job_id=job.job_id, tenant=alice)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await getattr(api.stub, call)(request)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            assert field_of(caught.value) == "job_id"
        untouched = (await api.jobs.get(job.job_id)).record
        assert untouched.status.phase == JobPhase.PENDING
        assert untouched.batch is None or not untouched.batch.progress.cancel_requested
    # The right tenant but the wrong kind is just as missing.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.stub.GetJob(
            pb.GetJobRequest(job_id=mine[1].job_id, tenant=alice, kind=pb.JOB_KIND_BATCH)
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_cancel_marks_a_batch_for_its_controller(api: Api) -> None:
    who = tenant()
    job = await api.batch(who)
    request = pb.CancelJobRequest(job_id=job.job_id, tenant=who, kind=pb.JOB_KIND_BATCH)
    cancelled = (await api.stub.CancelJob(request)).job
    # Not terminal yet: the batch controller stops sending and ends it with partial results.
    assert cancelled.status.phase == pb.JOB_PHASE_PENDING
    assert cancelled.status.batch.cancel_requested
    assert cancelled.status.batch.HasField("cancelling_at_unix")
    assert cancelled.events[-1].reason == "Cancelling"
    again = (await api.stub.CancelJob(request)).job
    assert again.revision == cancelled.revision  # a second cancel writes nothing
    assert again.status.batch.cancelling_at_unix == cancelled.status.batch.cancelling_at_unix


@pytest.mark.parametrize(
    ("phase", "status"), [(JobPhase.SUCCEEDED, "completed"), (JobPhase.FAILED, "failed")]
)
async def test_a_finished_batch_cannot_be_cancelled(api: Api, phase: JobPhase, status: str) -> None:
    job = await api.batch(tenant())

    def finish(record: JobRecord) -> JobRecord:
        record.status.phase = phase
        return record

    await api.jobs.update(job.job_id, finish)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"Cannot cancel a batch with status '{status}'" in (caught.value.details() or "")
    assert field_of(caught.value) == "job_id"
    record = (await api.jobs.get(job.job_id)).record
    assert record.batch is not None and not record.batch.progress.cancel_requested


async def test_an_expired_batch_cancels_as_a_no_op(api: Api) -> None:
    job = await api.batch(tenant())

    def expire(record: JobRecord) -> JobRecord:
        record.status.phase = JobPhase.EXPIRED
        return record

    expired = await api.jobs.update(job.job_id, expire)
    reply = (await api.stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id))).job
    assert reply.status.phase == pb.JOB_PHASE_EXPIRED and reply.revision == expired.mod_revision
    assert not reply.status.batch.cancel_requested


async def test_cancel_ends_a_fine_tuning_job_at_once(api: Api) -> None:
    who = tenant()
    job = await api.fine_tuning(who)
    request = pb.CancelJobRequest(job_id=job.job_id, tenant=who, kind=pb.JOB_KIND_FINE_TUNING)
    cancelled = (await api.stub.CancelJob(request)).job
    assert cancelled.status.phase == pb.JOB_PHASE_CANCELLED
    assert (await api.stub.CancelJob(request)).job.revision == cancelled.revision


async def test_client_returns_records_and_domain_errors(api: Api) -> None:
    who = tenant()
    file_id = await api.upload(batch_file(3), "batch", who)
    client = JobManagerClient(api.address)
    try:
        created = await client.create(BatchSpec(input_file_id=file_id, tenant=who))
        assert created.batch is not None and created.batch.progress.total == 3
        assert await client.get(created.job_id, tenant=who) == created
        assert [j.job_id for j in await client.list(JobKind.BATCH, tenant=who)] == [created.job_id]
        with pytest.raises(InvalidArgument) as invalid:
            await client.create(BatchSpec(input_file_id=file_id, tenant=who, endpoint="/x"))
        assert invalid.value.field == "endpoint" and "not supported" in invalid.value.message
        with pytest.raises(NotFound) as missing:
            await client.get(created.job_id, tenant=tenant())
        assert missing.value.field == "job_id"
        cancelled = await client.cancel(created.job_id, tenant=who, kind=JobKind.BATCH)
        assert cancelled.batch is not None and cancelled.batch.progress.cancel_requested
    finally:
        await client.close()


async def test_client_finds_jobmgr_in_the_service_registry(api: Api, etcd: EtcdStore) -> None:
    # Registered earliest of all, so it is picked over any other jobmgr still registered.
    process_id = f"jobmgr-test-{uuid.uuid4().hex[:6]}"
    registry = records.services(etcd, "jobmgr")
    record = records.ServiceRecord(
        service="jobmgr",
        process_id=process_id,
        address=api.address,
        pid=0,
        host="127.0.0.1",
        started_at=0.0,
    )
    await registry.create(process_id, record)
    client = JobManagerClient("", etcd=etcd)
    try:
        job = await api.batch(tenant())
        assert job.job_id in {j.job_id for j in await client.list(JobKind.BATCH)}
    finally:
        await client.close()
        await registry.delete(process_id)


async def test_client_of_an_unreachable_jobmgr_is_unavailable() -> None:
    client = JobManagerClient(f"127.0.0.1:{free_port()}", timeout_s=5)
    try:
        with pytest.raises(Unavailable):
            await client.list(JobKind.BATCH)
    finally:
        await client.close()
