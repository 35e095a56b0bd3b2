"""FlowServeService: wire types in, domain calls out. Generate streams engine outputs."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import grpc

from deepserve.errors import InvalidArgument
from deepserve.flowserve.engine.outputs import GenerationOutput
from deepserve.flowserve.engine.tracing import record_engine_spans
from deepserve.flowserve.pod.engine_metrics import RequestLatency
from deepserve.flowserve.pod.scale_up_wire import load_model_reply, weights_plan_from_proto
from deepserve.flowserve.pod.shell import TaskExecutorShell
from deepserve.sampling_params import SamplingParams
from deepserve.v1 import common_pb2, flowserve_pb2, flowserve_pb2_grpc
from deepserve.wire import role_from_proto, role_to_proto, structured_output_from_proto

log = logging.getLogger(__name__)

# Timing events on the decode span stop here (a long generation keeps its totals).
MAX_TOKEN_EVENTS = 512

_FINISH = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
    "error": common_pb2.FINISH_REASON_ERROR,
}


def sampling_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    """Proto3 zeros mean "unset" where zero is not a meaningful value."""
    return SamplingParams(
        temperature=msg.temperature,
        top_p=msg.top_p or 1.0,
        top_k=msg.top_k,
        min_p=msg.min_p,
        seed=msg.seed if msg.HasField("seed") else None,
        repetition_penalty=msg.repetition_penalty or 1.0,
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        stop=list(msg.stop),
        stop_token_ids=list(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        max_tokens=msg.max_tokens or None,
        min_tokens=msg.min_tokens,
        logprobs=msg.logprobs,
        top_logprobs=msg.top_logprobs,
        skip_special_tokens=not msg.keep_special_tokens,
        structured_output=structured_output_from_proto(msg.structured_output),
    )


class FlowServeServicer(flowserve_pb2_grpc.FlowServeServiceServicer):
    def __init__(self, shell: TaskExecutorShell) -> None:
        self._shell = shell

    def _to_proto(self, out: GenerationOutput) -> flowserve_pb2.GenerateResponse:
        reply = flowserve_pb2.GenerateResponse(
            request_id=out.request_id, token_ids=out.new_token_ids, text=out.new_text
        )
        if out.logprobs:
            tok = self._shell.tokenizer
            for lp in out.logprobs:
                entry = reply.logprobs.add()
                entry.chosen.token_id = lp.token_id
                entry.chosen.logprob = lp.logprob
                if tok is not None:
                    entry.chosen.token = tok.convert_ids_to_tokens([lp.token_id])[0] or ""
                for tid, value in lp.top:
                    alt = entry.top.add(token_id=tid, logprob=value)
                    if tok is not None:
                        alt.token = tok.convert_ids_to_tokens([tid])[0] or ""
        if out.finish_reason is not None:
            reply.finish_reason = _FINISH.get(out.finish_reason, common_pb2.FINISH_REASON_STOP)
            if out.stop_reason is not None:
                reply.stop_reason = str(out.stop_reason)
            reply.usage.prompt_tokens = out.num_prompt_tokens
            reply.usage.completion_tokens = out.num_output_tokens
            reply.usage.total_tokens = out.num_prompt_tokens + out.num_output_tokens
            reply.usage.cached_tokens = out.num_cached_tokens
        return reply

    async def Generate(
        self, request: flowserve_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[flowserve_pb2.GenerateResponse]:
        engine = self._shell.require_engine(request.model)
        if not request.request_id:
            raise InvalidArgument("a request id is required", field="request_id")
        params = sampling_from_proto(request.sampling)
        prompt = list(request.prompt_token_ids)
        resumed = list(request.output_token_ids)
        if request.adapter and request.prefill_address:
            raise InvalidArgument(
                "LoRA adapters are served on colocated instances", field="adapter"
            )
        if request.prefill_address and resumed:
            raise InvalidArgument(
                "a migrated request resumes on one instance, not through a prefill instance",
                field="output_token_ids",
            )
        if request.prefill_address:
            # PD disaggregation: this (decode) instance reserves blocks, the prefill instance
            # fills them and sends the first token, then this one decodes the rest.
            disagg = self._shell.require_disagg(request.model)
            source = disagg.remote_source(
                request.prefill_address,
                prompt,
                model=request.model,
                sampling=request.sampling,
                mode=request.kv_transfer_mode,
                cache_salt=request.cache_salt,
            )
            outputs = engine.generate_remote(
                request.request_id,
                prompt,
                params,
                source,
                reserve_timeout_s=disagg.settings.reserve_timeout_s,
                cache_salt=request.cache_salt,
            )
        else:
            outputs = engine.generate(
                request.request_id,
                prompt,
                params,
                priority=request.priority,
                output_token_ids=resumed,
                cache_salt=request.cache_salt,
                adapter=request.adapter,
                adapter_path=request.adapter_path,
            )
        # Leaving the loop early (the caller went away: grpc cancels this coroutine) closes the
        # engine's generator, which aborts the request and frees its KV blocks.
        latency = RequestLatency(request.model or self._shell.model_name)
        token_times: list[int] = []
        context_noted = not request.cached_context_id
        async for out in outputs:
            if not context_noted and out.new_token_ids:
                # The prompt's KV is computed: keep its context pinned here from now on.
                context_noted = True
                self._shell.keep_context_pinned(
                    request.cached_context_id,
                    prompt[: request.cached_context_tokens or len(prompt)],
                    salt=request.cache_salt,
                    expires_at=request.cached_context_expires_at_unix,
                )
            if out.new_token_ids:
                latency.on_tokens(len(out.new_token_ids))
                if len(token_times) < MAX_TOKEN_EVENTS:
                    token_times.append(time.time_ns())
            if out.finish_reason is not None:
                latency.on_finish(out.finish_reason)
                if out.timeline is not None:
                    record_engine_spans(
                        out.timeline,
                        request_id=request.request_id,
                        prompt_tokens=out.num_prompt_tokens,
                        cached_tokens=out.num_cached_tokens,
                        output_tokens=out.num_output_tokens,
                        token_times_ns=token_times,
                    )
            yield self._to_proto(out)

    async def Prefill(
        self, request: flowserve_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[flowserve_pb2.PrefillResponse]:
        disagg = self._shell.require_disagg(request.model)
        if not request.request_id:
            raise InvalidArgument("a request id is required", field="request_id")
        params = sampling_from_proto(request.sampling)
        # Ending early (the decode side went away) closes the stream, which frees the blocks.
        async for reply in disagg.prefill_stream(request, params):
            yield reply

    async def Abort(
        self, request: flowserve_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> flowserve_pb2.AbortResponse:
        engine = self._shell.require_engine("")
        return flowserve_pb2.AbortResponse(aborted=engine.abort(request.request_id))

    async def GetStats(
        self, request: flowserve_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> flowserve_pb2.GetStatsResponse:
        reply = flowserve_pb2.GetStatsResponse(
            instance_id=self._shell.instance_id,
            model=self._shell.model_name,
            role=role_to_proto(self._shell.role),
            ready=self._shell.ready,
        )
        if self._shell.engine is not None:
            s = self._shell.engine.stats()
            reply.running_requests = s.num_running
            reply.waiting_requests = s.num_waiting
            reply.kv_blocks_used = s.kv_blocks_used
            reply.kv_blocks_free = s.kv_blocks_free
            reply.kv_blocks_total = s.kv_blocks_total
            reply.prefix_cache_hit_rate = s.prefix_cache_hit_rate
            reply.generation_tokens_per_s = s.generation_tokens_per_s
        if self._shell.disagg is not None:
            r = self._shell.disagg.received
            reply.kv_received.CopyFrom(
                flowserve_pb2.KVTransferStats(
                    transfers=r.transfers,
                    failures=r.failures,
                    blocks=r.blocks,
                    skipped_blocks=r.skipped_blocks,
                    bytes=r.bytes,
                    transfer_seconds=r.transfer_seconds,
                    prefill_seconds=r.seconds,
                    layerwise=r.layerwise,
                    shared_memory=r.shared_memory,
                )
            )
        return reply

    async def LoadModel(
        self, request: flowserve_pb2.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> flowserve_pb2.LoadModelResponse:
        instance_id, seconds = await self._shell.load_model(
            request.model,
            role_from_proto(request.role),
            job_id=request.job_id,
            task_id=request.task_id,
            tp_size=request.tensor_parallel_size or 1,
            weights=weights_plan_from_proto(request),
        )
        return load_model_reply(instance_id, seconds, self._shell.last_timeline)

    async def StreamWeights(
        self, request: flowserve_pb2.StreamWeightsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[flowserve_pb2.StreamWeightsResponse]:
        # Fork: this instance's weights to a new one of the same model, while it keeps serving.
        from deepserve.flowserve.pod.fork import stream_weights

        async for reply in stream_weights(self._shell, request):
            yield reply

    async def UnloadModel(
        self, request: flowserve_pb2.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> flowserve_pb2.UnloadModelResponse:
        await self._shell.unload_model()
        return flowserve_pb2.UnloadModelResponse()

    async def PinContext(
        self, request: flowserve_pb2.PinContextRequest, context: grpc.aio.ServicerContext
    ) -> flowserve_pb2.PinContextResponse:
        engine = self._shell.require_engine(request.model)
        if not request.context_id:
            raise InvalidArgument("a context id is required", field="context_id")
        pinned, cached = await engine.pin_context(
            request.context_id,
            list(request.prompt_token_ids),
            salt=request.cache_salt,
            expires_at=request.expires_at_unix,
        )
        return flowserve_pb2.PinContextResponse(pinned_tokens=pinned, cached_tokens=cached)

    async def UnpinContext(
        self, request: flowserve_pb2.UnpinContextRequest, context: grpc.aio.ServicerContext
    ) -> flowserve_pb2.UnpinContextResponse:
        if self._shell.engine is None:
            return flowserve_pb2.UnpinContextResponse(unpinned=False)
        unpinned = await self._shell.engine.unpin_context(request.context_id)
        return flowserve_pb2.UnpinContextResponse(unpinned=unpinned)

    async def ListPinnedContexts(
        self, request: flowserve_pb2.ListPinnedContextsRequest, context: grpc.aio.ServicerContext
    ) -> flowserve_pb2.ListPinnedContextsResponse:
        pinned = await self._shell.engine.pinned_contexts() if self._shell.engine else []
        return flowserve_pb2.ListPinnedContextsResponse(
            contexts=[
                flowserve_pb2.PinnedContext(
                    context_id=p.context_id,
                    pinned_tokens=p.num_tokens,
                    expires_at_unix=p.expires_at,
                )
                for p in pinned
            ]
        )

    async def RunTraining(
        self, request: flowserve_pb2.RunTrainingRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[flowserve_pb2.RunTrainingResponse]:
        # Fine-tuning's train stage; imported here so serving-only pods never load peft.
        from deepserve.flowserve.training.training_service import training_service_for

        async for reply in training_service_for(self._shell).run(request):
            yield reply
