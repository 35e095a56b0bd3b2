"""Runs a GenerationJob on the engines: Route, then one FlowServe Generate per choice.

`n > 1` (or several prompts) fans out into one engine request per choice, merged into one
stream of deltas. Closing the stream (the client went away) cancels every engine call, and
the engine aborts a request whose call is cancelled. An engine that fails before its first
token is routed around (up to `retries` times); one that fails later ends the stream with an
error, never a hang: every call carries the job's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc

from deepserve.completions.prepared import GenerationJob, Prompt
from deepserve.completions.upstream import EngineStubs, SchedulerClient
from deepserve.errors import (
    DeadlineExceeded,
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
        return DeadlineExceeded("the request ran past its time limit")
    err = error_from_rpc(exc)
    if isinstance(err, InvalidArgument | ResourceExhausted | NotFound) and not started:
        return err
    if isinstance(err, FailedPrecondition):
        return Unavailable(f"instance {instance_id} is not ready: {err.message}")
    where = "mid-stream" if started else "before its first token"
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return Unavailable(f"instance {instance_id} failed {where}: {exc.details() or code.name}")
    return DeepServeError(f"instance {instance_id} failed {where}: {exc.details() or code.name}")


class Dispatcher:
    """Routes and runs jobs; one per gateway process."""

    def __init__(self, scheduler: SchedulerClient, engines: EngineStubs, retries: int = 1) -> None:
        self._scheduler = scheduler
        self._engines = engines
        self._retries = retries

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
        )
        if job.context is not None and job.context_tokens:
            request.cached_context_id = job.context.context_id
            request.cached_context_tokens = job.context_tokens
            request.cached_context_expires_at_unix = job.context.expires_at
        tried: list[str] = []
        while True:
            instance = target.instance
            request.prefill_address = target.prefill.address if target.prefill else ""
            call = self._engines.get(instance.address).Generate(
                request, timeout=self._remaining(job), metadata=self._metadata(job)
            )
            started = finished = False
            try:
                async for msg in call:
                    if finished:
                        continue  # the engine sends nothing after the last delta
                    started = True
                    delta = ChoiceDelta(index, msg.text, list(msg.token_ids), msg.logprobs)
                    if msg.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                        if msg.finish_reason == common_pb2.FINISH_REASON_ERROR:
                            raise Unavailable(
                                f"instance {instance.instance_id} failed while generating"
                            )
                        delta.finish_reason = FINISH_REASONS.get(msg.finish_reason, "stop")
                        delta.stop_reason = msg.stop_reason
                        delta.prompt_tokens = msg.usage.prompt_tokens
                        delta.completion_tokens = msg.usage.completion_tokens
                        delta.cached_tokens = msg.usage.cached_tokens
                        finished = True
                    yield delta
                # Read to the end of the stream (not stopping at the last delta), so the call
                # completes normally and its client span ends and is exported.
                if finished:
                    return
                raise Unavailable(
                    f"instance {instance.instance_id} ended the stream before finishing"
                )
            except grpc.aio.AioRpcError as exc:
                retryable = exc.code() in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.FAILED_PRECONDITION,
                )
                if started or not retryable or len(tried) >= self._retries:
                    raise engine_error(exc, instance.instance_id, started) from exc
                prefill_failed = target.prefill is not None and _PREFILL_FAILURE in (
                    exc.details() or ""
                )
                tried.append(
                    target.prefill.instance_id
                    if prefill_failed and target.prefill is not None
                    else instance.instance_id
                )
            finally:
                # A no-op after a clean finish; otherwise the engine sees the cancellation
                # and aborts the request (frees its KV blocks) at once.
                call.cancel()
            target = await self.route(job, prompt, exclude=tried)

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
