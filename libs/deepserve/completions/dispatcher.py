"""Runs a GenerationJob on the engines: Route, then one FlowServe Generate per choice.

`n > 1` (or several prompts) fans out into one engine request per choice, merged into one
stream of deltas. Closing the stream (the client went away) cancels every engine call, and
the engine aborts a request whose call is cancelled. An engine that fails before its first
token is routed around (up to `retries` times); one that fails later is migrated: the request
continues on another instance from the tokens already streamed (`deepserve.completions.
migration`), up to `max_migrations` times, after which the stream ends with an error. Never a
hang: every call carries the job's deadline. A failed instance is reported to the scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
from opentelemetry import trace

from deepserve.completions.migration import (
    INSTANCE_FAILURE_CODES,
    MIGRATIONS,
    REFUSAL_CODES,
    MigrationPolicy,
    RequestPath,
)
from deepserve.completions.prepared import GenerationJob, Prompt
from deepserve.completions.upstream import EngineStubs, SchedulerClient, request_deadline_passed
from deepserve.errors import (
    DeepServeError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from deepserve.rpc.errors import error_from_rpc
from deepserve.sampling_params import SamplingParams
from deepserve.v1 import common_pb2, flowserve_pb2, scheduler_pb2
from deepserve.wire import structured_output_to_proto

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)

FINISH_REASONS = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
}


@dataclass(slots=True)
class ChoiceDelta:
    """What one engine message adds to one choice."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: Sequence[common_pb2.TokenLogprobs] = ()
    # Set on a choice's last delta, with the engine's token counts.
    finish_reason: str | None = None
    stop_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Target:
    """Where one engine request runs: the instance that streams tokens, and for a
    disaggregated pair the prefill instance it pulls the prompt's KV from."""

    instance: common_pb2.Instance
    prefill: common_pb2.Instance | None = None


# The decode instance names its prefill peer this way when the hand-off failed there.
_PREFILL_FAILURE = "prefill instance"


@dataclass(slots=True)
class _Done:
    index: int
    error: BaseException | None = field(default=None)


def sampling_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        stop=params.stop,
        stop_token_ids=params.stop_token_ids,
        max_tokens=params.max_tokens or 0,
        min_tokens=params.min_tokens,
        ignore_eos=params.ignore_eos,
        logprobs=params.logprobs,
        top_logprobs=params.top_logprobs,
        keep_special_tokens=not params.skip_special_tokens,
    )
    if params.seed is not None:
        msg.seed = params.seed
    if params.structured_output is not None:
        msg.structured_output.CopyFrom(structured_output_to_proto(params.structured_output))
    return msg


def engine_error(exc: grpc.aio.AioRpcError, instance_id: str, started: bool) -> DeepServeError:
    """The domain error an engine's failed Generate stands for, as the API client should see it."""
    code = exc.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return request_deadline_passed()
    err = error_from_rpc(exc)
    if isinstance(err, InvalidArgument | ResourceExhausted | NotFound) and not started:
        return err
    if isinstance(err, FailedPrecondition):
        return Unavailable(f"instance {instance_id} is not ready: {err.message}")
    where = "mid-stream" if started else "before its first token"
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return Unavailable(f"instance {instance_id} failed {where}: {exc.details() or code.name}")
    return DeepServeError(f"instance {instance_id} failed {where}: {exc.details() or code.name}")


class _InstanceFailed(Exception):
    """An engine call ended in a way that says its instance failed (not the request)."""

    def __init__(self, instance_id: str, error: DeepServeError, reason: str) -> None:
        super().__init__(reason)
        self.instance_id = instance_id
        self.error = error
        self.reason = reason


class Dispatcher:
    """Routes and runs jobs; one per gateway process."""

    def __init__(
        self,
        scheduler: SchedulerClient,
        engines: EngineStubs,
        retries: int = 1,
        max_migrations: int = 2,
    ) -> None:
        self._scheduler = scheduler
        self._engines = engines
        self.policy = MigrationPolicy(retries=retries, max_migrations=max_migrations)
        # Failure reports in flight to the scheduler, kept referenced until they finish.
        self._reports: set[asyncio.Future[None]] = set()

    @staticmethod
    def _remaining(job: GenerationJob) -> float:
        return max(0.001, job.deadline - asyncio.get_running_loop().time())

    @staticmethod
    def _metadata(job: GenerationJob) -> tuple[tuple[str, str], ...]:
        return (("x-request-id", job.request_id),)

    async def route(
        self, job: GenerationJob, prompt: Prompt, exclude: Sequence[str] = ()
    ) -> Target:
        instances = await self._scheduler.route(
            scheduler_pb2.RouteRequest(
                request_id=job.request_id,
                model=job.model,
                tenant=job.tenant,
                prompt_tokens=len(prompt.token_ids),
                max_tokens=job.sampling.max_tokens or 0,
                prefix_block_hashes=prompt.block_hashes,
                block_size=job.block_size if prompt.block_hashes else 0,
                exclude_instance_ids=list(exclude),
                cached_context_id=job.context.context_id if job.context else "",
                adapter=job.adapter.adapter_id if job.adapter else "",
            ),
            timeout_s=self._remaining(job),
            metadata=self._metadata(job),
        )
        if len(instances) > 1:
            # Disaggregated: the decode instance pulls the prompt's KV and first token from the
            # prefill instance, then streams the rest.
            return Target(instances[-1], prefill=instances[0])
        return Target(instances[0])

    async def report_completion(
        self, job: GenerationJob, prompt: Prompt, completion_tokens: int
    ) -> None:
        """Feeds the scheduler's decode-length predictor; a lost report only costs accuracy."""
        with contextlib.suppress(DeepServeError):
            await self._scheduler.report_completion(
                scheduler_pb2.ReportCompletionRequest(
                    request_id=job.request_id,
                    model=job.model,
                    tenant=job.tenant,
                    prompt_tokens=len(prompt.token_ids),
                    completion_tokens=completion_tokens,
                    max_tokens=job.sampling.max_tokens or 0,
                )
            )

    def report_failure(self, job: GenerationJob, instance_id: str, reason: str) -> None:
        """Tells the scheduler (in the background) to stop routing to a failed instance."""
        task = asyncio.ensure_future(
            self._scheduler.report_instance_failure(instance_id, reason, job.request_id)
        )
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def route_all(self, job: GenerationJob) -> list[Target]:
        """One instance per prompt; the n choices of a prompt share it (and its cached prefix)."""
        if len(job.prompts) == 1:
            return [await self.route(job, job.prompts[0])]
        return list(await asyncio.gather(*(self.route(job, p) for p in job.prompts)))

    def stream(self, job: GenerationJob, instances: Sequence[Target]) -> AsyncIterator[ChoiceDelta]:
        """Deltas of every choice in arrival order; close it to cancel what still runs."""
        if job.fanout == 1:
            return self._generate(job, 0, instances[0])
        return self._merged(job, instances)

    async def _generate(
        self, job: GenerationJob, index: int, target: Target
    ) -> AsyncIterator[ChoiceDelta]:
        prompt = job.prompts[index // job.n]
        request = flowserve_pb2.GenerateRequest(
            request_id=f"{job.request_id}-{index}",
            model=job.model,
            prompt_token_ids=prompt.token_ids,
            sampling=sampling_to_proto(job.sampling_for(index)),
            detokenize=True,
            tenant=job.tenant,
            priority=job.priority,
            cache_salt=job.cache_salt,
            adapter=job.adapter.adapter_id if job.adapter else "",
            adapter_path=job.adapter.path if job.adapter else "",
        )
        if job.context is not None and job.context_tokens:
            request.cached_context_id = job.context.context_id
            request.cached_context_tokens = job.context_tokens
            request.cached_context_expires_at_unix = job.context.expires_at
        path = RequestPath()
        while True:
            instance = target.instance
            # A resumed request runs on one instance: it computes prompt + tokens itself.
            prefill = target.prefill if not path.started else None
            request.prefill_address = prefill.address if prefill is not None else ""
            del request.output_token_ids[:]
            request.output_token_ids.extend(path.generated)
            call = self._engines.get(instance.address).Generate(
                request, timeout=self._remaining(job), metadata=self._metadata(job)
            )
            finished = False
            try:
                try:
                    async for msg in call:
                        if finished:
                            continue  # the engine sends nothing after the last delta
                        if msg.finish_reason == common_pb2.FINISH_REASON_ERROR:
                            raise _InstanceFailed(
                                instance.instance_id,
                                Unavailable(
                                    f"instance {instance.instance_id} failed while generating"
                                ),
                                "the engine failed the request",
                            )
                        delta = ChoiceDelta(index, msg.text, list(msg.token_ids), msg.logprobs)
                        if msg.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                            delta.finish_reason = FINISH_REASONS.get(msg.finish_reason, "stop")
                            delta.stop_reason = msg.stop_reason
                            delta.prompt_tokens = msg.usage.prompt_tokens
                            delta.completion_tokens = msg.usage.completion_tokens
                            delta.cached_tokens = msg.usage.cached_tokens
                            finished = True
                        path.generated.extend(delta.token_ids)
                        yield delta
                    # Read to the end of the stream (not stopping at the last delta), so the call
                    # completes normally and its client span ends and is exported.
                    if finished:
                        return
                    raise _InstanceFailed(
                        instance.instance_id,
                        Unavailable(
                            f"instance {instance.instance_id} ended the stream before finishing"
                        ),
                        "the stream ended unfinished",
                    )
                except grpc.aio.AioRpcError as exc:
                    raise self._classify(exc, instance, prefill, path) from exc
            except _InstanceFailed as failure:
                failed = failure
            finally:
                # A no-op after a clean finish; otherwise the engine sees the cancellation
                # and aborts the request (frees its KV blocks) at once.
                call.cancel()
            target = await self._move(job, prompt, index, path, failed)

    def _classify(
        self,
        exc: grpc.aio.AioRpcError,
        instance: common_pb2.Instance,
        prefill: common_pb2.Instance | None,
        path: RequestPath,
    ) -> BaseException:
        """The failed call as a request error (raised as is) or an instance failure (moved)."""
        code = exc.code()
        details = exc.details() or code.name
        error = engine_error(exc, instance.instance_id, path.started)
        if code in INSTANCE_FAILURE_CODES or (not path.started and code in REFUSAL_CODES):
            failed = instance
            if prefill is not None and _PREFILL_FAILURE in details:
                failed = prefill  # the decode side is fine; its prefill peer failed
            return _InstanceFailed(failed.instance_id, error, f"{code.name}: {details}")
        return error

    async def _move(
        self,
        job: GenerationJob,
        prompt: Prompt,
        index: int,
        path: RequestPath,
        failure: _InstanceFailed,
    ) -> Target:
        """Where a request whose instance failed goes on; raises the failure when nowhere."""
        failed_id = failure.instance_id
        path.failed_instances.append(failed_id)
        self.report_failure(job, failed_id, failure.reason)
        started = path.started
        if not path.may_move(self.policy):
            if started:
                MIGRATIONS.labels(job.model, "exhausted").inc()
            raise failure.error
        path.moved()
        with _tracer.start_as_current_span(
            "migrate" if started else "reroute",
            attributes={
                "request_id": job.request_id,
                "choice": index,
                "from_instance": failed_id,
                "resumed_tokens": len(path.generated),
                "reason": failure.reason,
                "attempt": path.migrations if started else path.retries,
            },
        ) as span:
            try:
                target = await self.route(job, prompt, exclude=path.failed_instances)
            except DeepServeError as exc:
                if started:
                    MIGRATIONS.labels(job.model, "no_instance").inc()
                span.set_attribute("error", str(exc))
                raise failure.error from exc
            span.set_attribute("to_instance", target.instance.instance_id)
        if started:
            MIGRATIONS.labels(job.model, "migrated").inc()
            log.info(
                "request %s choice %d migrated from %s to %s after %d tokens (%s)",
                job.request_id,
                index,
                failed_id,
                target.instance.instance_id,
                len(path.generated),
                failure.reason,
            )
        return target

    async def _merged(
        self, job: GenerationJob, instances: Sequence[Target]
    ) -> AsyncIterator[ChoiceDelta]:
        queue: asyncio.Queue[ChoiceDelta | _Done] = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async for delta in self._generate(job, index, instances[index // job.n]):
                    queue.put_nowait(delta)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                queue.put_nowait(_Done(index, exc))
                return
            queue.put_nowait(_Done(index))

        tasks = [asyncio.create_task(pump(i)) for i in range(job.fanout)]
        running = len(tasks)
        try:
            while running:
                item = await queue.get()
                if isinstance(item, _Done):
                    running -= 1
                    if item.error is not None:
                        raise item.error
                    continue
                yield item
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)
