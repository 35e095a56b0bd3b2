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

from deepserve.errors import (
    DeadlineExceeded,
    DeepServeError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from deepserve.flowserve.sampling.params import SamplingParams
from deepserve.gateway.job import GenerationJob, Prompt
from deepserve.gateway.upstream import EngineStubs, SchedulerClient
from deepserve.rpc.errors import error_from_rpc
from deepserve.v1 import common_pb2, flowserve_pb2, scheduler_pb2

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
    ) -> common_pb2.Instance:
        instances = await self._scheduler.route(
            scheduler_pb2.RouteRequest(
                request_id=job.request_id,
                model=job.model,
                tenant=job.tenant,
                prompt_tokens=len(prompt.token_ids),
                max_tokens=job.sampling.max_tokens or 0,
                prefix_block_hashes=prompt.block_hashes,
                exclude_instance_ids=list(exclude),
            ),
            timeout_s=self._remaining(job),
            metadata=self._metadata(job),
        )
        # Disaggregated: the decode instance streams the tokens. Until the engines hand KV
        # over, it runs the prefill itself, so the answer is the same, only slower.
        return instances[-1]

    async def route_all(self, job: GenerationJob) -> list[common_pb2.Instance]:
        """One instance per prompt; the n choices of a prompt share it (and its cached prefix)."""
        if len(job.prompts) == 1:
            return [await self.route(job, job.prompts[0])]
        return list(await asyncio.gather(*(self.route(job, p) for p in job.prompts)))

    def stream(
        self, job: GenerationJob, instances: Sequence[common_pb2.Instance]
    ) -> AsyncIterator[ChoiceDelta]:
        """Deltas of every choice in arrival order; close it to cancel what still runs."""
        if job.fanout == 1:
            return self._generate(job, 0, instances[0])
        return self._merged(job, instances)

    async def _generate(
        self, job: GenerationJob, index: int, instance: common_pb2.Instance
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
        )
        tried: list[str] = []
        while True:
            call = self._engines.get(instance.address).Generate(
                request, timeout=self._remaining(job), metadata=self._metadata(job)
            )
            started = False
            try:
                async for msg in call:
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
                        yield delta
                        return
                    yield delta
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
                tried.append(instance.instance_id)
            finally:
                # A no-op after a clean finish; otherwise the engine sees the cancellation
                # and aborts the request (frees its KV blocks) at once.
                call.cancel()
            instance = await self.route(job, prompt, exclude=tried)

    async def _merged(
        self, job: GenerationJob, instances: Sequence[common_pb2.Instance]
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
