"""The batch controller over real etcd and a local file store, with a fake line runner:
results matched by custom_id, counts, cancel with partial output, resume without resending."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from deepserve.files import FileService, LocalFileStore
from deepserve.jobmgr.batch.controller import BatchController
from deepserve.jobmgr.batch.line_runner import LineResult, result_line
from deepserve.jobmgr.batch.settings import BatchSettings
from deepserve.jobs.batch import BatchSpec
from deepserve.jobs.records import JobPhase, JobRecord
from deepserve.jobs.store import JobStore
from deepserve.store.etcd import EtcdStore

pytestmark = pytest.mark.timeout(60)
SETTINGS = BatchSettings(concurrency=4, flush_interval_s=0.05)


def batch_file(n: int) -> bytes:
    rows = []
    for i in range(n):
        custom_id = f"bad-{i}" if i % 10 == 3 else f"req-{i}"
        body = {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]}
        rows.append(
            json.dumps(
                {
                    "custom_id": custom_id,
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": body,
                }
            )
        )
    return ("\n".join(rows) + "\n").encode()


class FakeRunner:
    """Answers each line with its question; custom ids starting 'bad' fail; can be held."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.gate: asyncio.Event | None = None
        self.hold_after = 0

    async def run(self, index: int, line: dict[str, Any], tenant: str) -> LineResult:
        custom_id = line["custom_id"]
        self.sent.append(custom_id)
        if self.gate is not None and len(self.sent) > self.hold_after:
            await self.gate.wait()
        if custom_id.startswith("bad"):
            body = {"error": {"message": "no", "type": "invalid_request_error"}}
            return LineResult(index, custom_id, False, result_line(custom_id, "r", 400, body))
        answer = line["body"]["messages"][0]["content"]
        body = {"object": "chat.completion", "choices": [{"message": {"content": answer}}]}
        return LineResult(index, custom_id, True, result_line(custom_id, "r", 200, body))


@pytest_asyncio.fixture
async def env(etcd_endpoint: str, tmp_path: Path) -> AsyncIterator[tuple[EtcdStore, FileService]]:
    async with EtcdStore(etcd_endpoint) as etcd:
        yield etcd, FileService(etcd, LocalFileStore(tmp_path), max_bytes=1 << 20)


async def create(etcd: EtcdStore, files: FileService, n: int, expires_at: float = 0.0) -> str:
    """A batch as jobmgr's CreateJob makes it (through the JobStore), its window optionally
    moved to `expires_at`."""
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    record = await files.upload(batch_file(n), filename="in.jsonl", purpose="batch", tenant=tenant)
    jobs = JobStore(etcd)
    job = await jobs.create_batch(BatchSpec(input_file_id=record.file_id, tenant=tenant), n)
    if expires_at:

        def window(found: JobRecord) -> JobRecord:
            assert found.batch is not None
            found.batch.spec.expires_at = expires_at
            return found

        await jobs.update(job.record.job_id, window)
    return job.record.job_id


async def drive(
    controller: BatchController,
    jobs: JobStore,
    job_id: str,
    until: Callable[[JobRecord], bool],
) -> JobRecord:
    for _ in range(1000):
        await controller.reconcile()
        job = (await jobs.get(job_id)).record
        if until(job):
            return job
        await asyncio.sleep(0.02)
    raise AssertionError(f"batch never reached the condition: {job.status}")


async def results(files: FileService, file_id: str) -> list[dict[str, Any]]:
    if not file_id:
        return []
    data = await files.content(file_id)
    return [json.loads(line) for line in data.decode().splitlines()]


async def test_every_line_is_answered_once_and_matched_by_custom_id(env: Any) -> None:
    etcd, files = env
    jobs = JobStore(etcd)
    job_id = await create(etcd, files, 40)
    controller = BatchController(etcd, files, FakeRunner(), SETTINGS)
    try:
        job = await drive(controller, jobs, job_id, lambda j: j.status.phase.terminal)
    finally:
        await controller.stop()
    assert job.status.phase == JobPhase.SUCCEEDED
    assert job.batch is not None
    progress = job.batch.progress
    assert (progress.total, progress.completed, progress.failed) == (40, 36, 4)
    outputs = await results(files, progress.output_file_id)
    errors = await results(files, progress.error_file_id)
    assert [o["custom_id"] for o in outputs] == [f"req-{i}" for i in range(40) if i % 10 != 3]
    assert [e["custom_id"] for e in errors] == [f"bad-{i}" for i in (3, 13, 23, 33)]
    for out in outputs:
        index = out["custom_id"].removeprefix("req-")
        assert out["response"]["status_code"] == 200 and out["error"] is None
        assert out["response"]["body"]["choices"][0]["message"]["content"] == f"q{index}"
    assert all(e["response"]["status_code"] == 400 for e in errors)


async def test_a_closed_window_expires_the_batch_with_the_unsent_lines_as_errors(
    env: Any,
) -> None:
    etcd, files = env
    jobs = JobStore(etcd)
    runner = FakeRunner()
    runner.gate, runner.hold_after = asyncio.Event(), 8
    job_id = await create(etcd, files, 40, expires_at=time.time() + 600)
    controller = BatchController(etcd, files, runner, SETTINGS)

    def eight_saved(job: JobRecord) -> bool:
        assert job.batch is not None
        return job.batch.progress.completed + job.batch.progress.failed >= 8

    try:
        await drive(controller, jobs, job_id, eight_saved)

        def close_window(job: JobRecord) -> JobRecord:
            assert job.batch is not None
            job.batch.spec.expires_at = time.time() - 1
            return job

        await jobs.update(job_id, close_window)
        # This leader keeps its spec: a new one (after a restart) reads the closed window.
        await controller.stop()
        runner.gate.set()
        sent_before = len(runner.sent)
        controller = BatchController(etcd, files, runner, SETTINGS)
        job = await drive(controller, jobs, job_id, lambda j: j.status.phase.terminal)
    finally:
        await controller.stop()
    assert job.status.phase == JobPhase.EXPIRED and job.batch is not None
    progress = job.batch.progress
    assert progress.expired_at is not None
    outputs = await results(files, progress.output_file_id)
    errors = await results(files, progress.error_file_id)
    assert len(outputs) + len(errors) == 40
    expired = [e for e in errors if e["error"] and e["error"]["code"] == "batch_expired"]
    assert len(runner.sent) == sent_before  # nothing sent after the window closed
    assert 40 - sent_before <= len(expired) < 40
    answered = {r["custom_id"] for r in outputs + errors}
    assert answered == {f"bad-{i}" if i % 10 == 3 else f"req-{i}" for i in range(40)}
    assert any(e.reason == "Expired" for e in job.events)


async def test_cancel_stops_sending_and_keeps_partial_output(env: Any) -> None:
    etcd, files = env
    jobs = JobStore(etcd)
    job_id = await create(etcd, files, 40)
    runner = FakeRunner()
    runner.gate, runner.hold_after = asyncio.Event(), 8
    controller = BatchController(etcd, files, runner, SETTINGS)
    try:
        await drive(controller, jobs, job_id, lambda j: len(runner.sent) > 8)

        def cancel(job: JobRecord) -> JobRecord:
            assert job.batch is not None
            job.batch.progress.cancel_requested = True
            return job

        await jobs.update(job_id, cancel)
        await controller.reconcile()
        runner.gate.set()  # the lines in flight finish; no new ones start
        job = await drive(controller, jobs, job_id, lambda j: j.status.phase.terminal)
    finally:
        await controller.stop()
    assert job.status.phase == JobPhase.CANCELLED and job.batch is not None
    progress = job.batch.progress
    sent = len(runner.sent)
    assert 8 < sent < 40
    assert progress.completed + progress.failed == sent
    outputs = await results(files, progress.output_file_id)
    assert len(outputs) == progress.completed > 0


async def test_a_new_leader_resumes_without_resending_saved_lines(env: Any) -> None:
    etcd, files = env
    jobs = JobStore(etcd)
    job_id = await create(etcd, files, 30)
    first = FakeRunner()
    first.gate, first.hold_after = asyncio.Event(), 12
    leader = BatchController(etcd, files, first, SETTINGS)

    def saved_twelve(j: JobRecord) -> bool:
        assert j.batch is not None
        return j.batch.progress.completed + j.batch.progress.failed >= 12

    await drive(leader, jobs, job_id, saved_twelve)
    await leader.stop()  # the leader dies with lines in flight
    saved = {c for c in first.sent[:12]}
    second = FakeRunner()
    follower = BatchController(etcd, files, second, SETTINGS)
    try:
        job = await drive(follower, jobs, job_id, lambda j: j.status.phase.terminal)
    finally:
        await follower.stop()
    assert job.batch is not None and job.status.phase == JobPhase.SUCCEEDED
    assert not saved & set(second.sent)
    outputs = await results(files, job.batch.progress.output_file_id)
    errors = await results(files, job.batch.progress.error_file_id)
    ids = [r["custom_id"] for r in outputs + errors]
    assert sorted(ids) == sorted({*ids}) and len(ids) == 30
    assert any("Resumed" == e.reason for e in job.events)


async def test_missing_input_file_fails_the_batch_with_errors(env: Any) -> None:
    etcd, files = env
    jobs = JobStore(etcd)
    job_id = await create(etcd, files, 3)
    job = (await jobs.get(job_id)).record
    assert job.batch is not None
    await files.delete(job.batch.spec.input_file_id, job.batch.spec.tenant)
    controller = BatchController(etcd, files, FakeRunner(), SETTINGS)
    try:
        job = await drive(controller, jobs, job_id, lambda j: j.status.phase.terminal)
    finally:
        await controller.stop()
    assert job.status.phase == JobPhase.FAILED and job.batch is not None
    assert job.batch.progress.errors[0].code == "not_found"
