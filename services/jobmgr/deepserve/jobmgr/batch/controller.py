"""Drives batch jobs on the jobmgr leader: validate the input file, run its lines, write results.

Level-triggered like the fine-tuning controller: each pass starts one background operation
per unfinished batch, which continues from the stage recorded in the job. Finished lines are
saved as result segments in the file store (and counted in the job) every flush interval, so
a new leader reads them back and sends only the lines not yet answered. A cancel stops
sending new lines; the lines in flight finish, and the batch ends `cancelled` with the
partial results in its output and error files. When the completion window closes first, no
new line is sent either; the batch ends `expired`, and each line never answered gets a
`batch_expired` line in the error file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from deepserve.errors import DeepServeError, InvalidArgument, NotFound
from deepserve.files import FilePurpose, FileService
from deepserve.files.validation import iter_jsonl, validate_jsonl
from deepserve.jobmgr.batch.line_runner import LineResult, expired_line
from deepserve.jobmgr.batch.settings import BatchSettings
from deepserve.jobmgr.job_operations import JobOperations
from deepserve.jobs.batch import (
    BatchError,
    BatchJob,
    BatchStage,
    batch_artifacts,
    segment_artifact,
)
from deepserve.jobs.records import JobKind, JobPhase, JobRecord
from deepserve.jobs.store import JobStore
from deepserve.store.etcd import EtcdStore

log = logging.getLogger(__name__)


class LineRunner(Protocol):
    """Runs one input line; returns its output or error line (never raises for the line)."""

    async def run(self, index: int, line: dict[str, Any], tenant: str) -> LineResult: ...


class BatchController:
    """Runs every batch job while this jobmgr replica leads."""

    def __init__(
        self,
        store: EtcdStore,
        files: FileService,
        runner: LineRunner,
        settings: BatchSettings | None = None,
    ) -> None:
        self._jobs = JobStore(store)
        self._files = files
        self._runner = runner
        self._settings = settings or BatchSettings()
        self._cancels: dict[str, asyncio.Event] = {}
        self._ops = JobOperations("batch", on_done=lambda job_id: self._cancels.pop(job_id, None))
        self.wake = self._ops.wake

    # --- passes ----------------------------------------------------------------------------

    async def reconcile(self) -> None:
        for found in await self._jobs.list(JobKind.BATCH):
            rec = found.record
            op = self._ops.get(rec.job_id)
            if rec.status.phase.terminal or rec.delete_requested or rec.batch is None:
                if op is not None:
                    op.cancel()
                continue
            if rec.batch.progress.cancel_requested:
                self._cancel_event(rec.job_id).set()
            if op is None:
                self._ops.spawn(rec.job_id, self._drive(rec.job_id))

    def _cancel_event(self, job_id: str) -> asyncio.Event:
        return self._cancels.setdefault(job_id, asyncio.Event())

    async def stop(self) -> None:
        await self._ops.stop()

    # --- stages ----------------------------------------------------------------------------

    async def _drive(self, job_id: str) -> None:
        while True:
            job = (await self._jobs.get(job_id)).record
            if job.status.phase.terminal or job.batch is None:
                return
            if job.batch.progress.cancel_requested:
                self._cancel_event(job_id).set()
            stage = job.batch.progress.stage
            try:
                if stage == BatchStage.VALIDATING:
                    await self._validate(job)
                elif stage == BatchStage.IN_PROGRESS:
                    await self._run_lines(job)
                elif stage == BatchStage.FINALIZING:
                    await self._finalize(job)
                else:
                    return
            except (InvalidArgument, NotFound) as exc:
                # The input file went away or changed under the batch: its fault, not ours.
                await self._fail(job_id, exc)
                return

    async def _input_lines(self, job: JobRecord) -> list[dict[str, Any]]:
        assert job.batch is not None
        spec = job.batch.spec
        data = await self._files.content(spec.input_file_id, spec.tenant)
        return [line for _, line in iter_jsonl(data)]

    async def _validate(self, job: JobRecord) -> None:
        assert job.batch is not None
        spec = job.batch.spec
        try:
            record = await self._files.get(spec.input_file_id, spec.tenant)
            data = await self._files.content(spec.input_file_id, spec.tenant)
            if record.purpose != FilePurpose.BATCH:
                raise InvalidArgument(
                    f"file {record.file_id} has purpose {record.purpose.value!r}, not 'batch'",
                    field="input_file_id",
                )
            total = await asyncio.to_thread(validate_jsonl, FilePurpose.BATCH, data)
        except (InvalidArgument, NotFound) as exc:
            await self._fail(job.job_id, exc)
            return

        def validated(j: JobRecord, b: BatchJob) -> None:
            j.status.phase = JobPhase.RUNNING
            j.status.message = f"running {total} requests"
            b.progress.total = total
            b.progress.stage = BatchStage.IN_PROGRESS
            b.progress.in_progress_at = time.time()
            j.record_event("Validated", f"{total} requests in {spec.input_file_id}")

        await self._update(job.job_id, validated)

    async def _run_lines(self, job: JobRecord) -> None:
        assert job.batch is not None
        spec, progress = job.batch.spec, job.batch.progress
        lines = await self._input_lines(job)
        saved = await asyncio.to_thread(self._read_segments, job.job_id, progress.segments)
        done = {r["index"] for r in saved}
        todo: Iterator[int] = (i for i in range(len(lines)) if i not in done)
        cancel = self._cancel_event(job.job_id)
        expires_at = spec.expires_at
        pending: list[LineResult] = []
        segments = progress.segments
        counts = [sum(r["ok"] for r in saved), sum(not r["ok"] for r in saved)]
        if saved:
            await self._job_event(
                job.job_id, "Resumed", f"{len(saved)} requests already answered, not resent"
            )

        async def worker() -> None:
            for index in todo:
                if cancel.is_set() or (expires_at and time.time() >= expires_at):
                    return
                pending.append(await self._runner.run(index, lines[index], spec.tenant))

        async def flush() -> None:
            nonlocal segments
            if not pending:
                return
            batch, pending[:] = list(pending), []
            payload = "".join(
                json.dumps({"index": r.index, "ok": r.ok, "line": r.line}) + "\n" for r in batch
            ).encode()
            await asyncio.to_thread(
                self._files.blobs.put_artifact, segment_artifact(job.job_id, segments), payload
            )
            segments += 1
            counts[0] += sum(r.ok for r in batch)
            counts[1] += sum(not r.ok for r in batch)

            def saved_segment(j: JobRecord, b: BatchJob) -> None:
                b.progress.segments = segments
                b.progress.completed, b.progress.failed = counts
                if b.progress.cancel_requested:
                    cancel.set()

            await self._update(job.job_id, saved_segment)

        workers = [asyncio.create_task(worker()) for _ in range(max(1, self._settings.concurrency))]
        running = asyncio.gather(*workers)
        # Retrieved even when this operation is cancelled mid-run (a leader change).
        running.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            while not running.done():
                await asyncio.wait([running], timeout=self._settings.flush_interval_s)
                await flush()
            running.result()
        finally:
            for task in workers:
                task.cancel()
        await flush()
        answered = sum(counts)  # saved before this run, plus this run's
        expired = answered < len(lines) and not cancel.is_set() and bool(expires_at)

        def finalizing(j: JobRecord, b: BatchJob) -> None:
            b.progress.stage = BatchStage.FINALIZING
            b.progress.finalizing_at = time.time()
            if expired and not b.progress.cancel_requested:
                b.progress.expired_at = b.progress.finalizing_at
                j.record_event(
                    "Expired",
                    f"the completion window closed with {len(lines) - answered} of "
                    f"{len(lines)} requests not sent",
                )
            j.status.message = "writing the output files"

        await self._update(job.job_id, finalizing)

    async def _finalize(self, job: JobRecord) -> None:
        assert job.batch is not None
        spec, progress = job.batch.spec, job.batch.progress
        saved = await asyncio.to_thread(self._read_segments, job.job_id, progress.segments)
        if progress.expired_at and not progress.cancel_requested:
            answered = {r["index"] for r in saved}
            lines = await self._input_lines(job)
            saved += [
                {"index": i, "ok": False, "line": expired_line(str(line.get("custom_id", "")))}
                for i, line in enumerate(lines)
                if i not in answered
            ]
        saved.sort(key=lambda r: r["index"])
        outputs = [r["line"] for r in saved if r["ok"]]
        errors = [r["line"] for r in saved if not r["ok"]]
        output_id = await self._store_results(job.job_id, "output", outputs, spec.tenant)
        error_id = await self._store_results(job.job_id, "error", errors, spec.tenant)

        def finished(j: JobRecord, b: BatchJob) -> None:
            now = time.time()
            b.progress.output_file_id, b.progress.error_file_id = output_id, error_id
            b.progress.completed, b.progress.failed = len(outputs), len(errors)
            b.progress.stage = BatchStage.DONE
            if b.progress.cancel_requested:
                j.status.phase = JobPhase.CANCELLED
                j.status.message = "cancelled by user"
                b.progress.cancelled_at = now
                j.record_event("Cancelled", f"{len(saved)} of {b.progress.total} answered")
            elif b.progress.expired_at:
                j.status.phase = JobPhase.EXPIRED
                j.status.message = "the completion window closed before every request ran"
            else:
                j.status.phase = JobPhase.SUCCEEDED
                j.status.message = "completed"
                b.progress.completed_at = now
                j.record_event("Completed", f"{len(outputs)} succeeded, {len(errors)} failed")

        await self._update(job.job_id, finished)
        await asyncio.to_thread(self._files.blobs.delete_artifacts, batch_artifacts(job.job_id))

    # --- results ---------------------------------------------------------------------------

    def _read_segments(self, job_id: str, count: int) -> list[dict[str, Any]]:
        """The results saved so far (first `count` segments); a line answered twice counts once."""
        by_index: dict[int, dict[str, Any]] = {}
        for segment in range(count):
            data = self._files.blobs.get_artifact(segment_artifact(job_id, segment))
            for text in data.decode().splitlines():
                if text.strip():
                    result = json.loads(text)
                    by_index.setdefault(result["index"], result)
        return list(by_index.values())

    async def _store_results(
        self, job_id: str, kind: str, lines: list[dict[str, Any]], tenant: str
    ) -> str:
        if not lines:
            return ""
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        record = await self._files.store(
            data,
            filename=f"{job_id}_{kind}.jsonl",
            purpose=FilePurpose.BATCH_OUTPUT,
            tenant=tenant,
            lines=len(lines),
        )
        return record.file_id

    # --- writes ----------------------------------------------------------------------------

    async def _update(self, job_id: str, change: Callable[[JobRecord, BatchJob], None]) -> None:
        def apply(job: JobRecord) -> JobRecord | None:
            if job.batch is None or job.status.phase.terminal:
                return None
            change(job, job.batch)
            return job

        await self._jobs.update(job_id, apply)

    async def _job_event(self, job_id: str, reason: str, message: str) -> None:
        await self._jobs.add_event(job_id, reason, message)

    async def _fail(self, job_id: str, exc: DeepServeError) -> None:
        line = None
        if exc.message.startswith("line "):
            with contextlib.suppress(ValueError):
                line = int(exc.message.split(":", 1)[0].removeprefix("line "))

        def failed(j: JobRecord, b: BatchJob) -> None:
            j.status.phase = JobPhase.FAILED
            j.status.message = f"validation failed: {exc.message}"
            b.progress.failed_at = time.time()
            b.progress.errors = [
                BatchError(
                    code="invalid_request" if isinstance(exc, InvalidArgument) else "not_found",
                    message=exc.message,
                    param=exc.field,
                    line=line,
                )
            ]
            j.record_event("Failed", j.status.message)

        await self._update(job_id, failed)
