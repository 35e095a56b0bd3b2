"""The request path both APIs share: authenticate, check the model, tokenize, admit, route, run.

HTTP (`http_app`) and gRPC (`servicer`) translate their wire types into the OpenAI request
models and call `Gateway.open_call`; what comes back is an `ApiCall` that has already routed and
received its first token.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time

import redis.asyncio as aioredis
from opentelemetry import trace

from deepserve.completions.call import ApiCall
from deepserve.completions.context_store import ContextStore
from deepserve.completions.conversation_store import ResponseStore
from deepserve.completions.dispatcher import Dispatcher
from deepserve.completions.prepare import prefix_block_size, prepare_chat, prepare_completion
from deepserve.completions.prepared import AdapterTarget, GenerationJob
from deepserve.completions.protocol import ChatCompletionRequest, CompletionRequest
from deepserve.completions.tokenizer_registry import TokenizerRegistry
from deepserve.completions.upstream import EngineStubs, SchedulerClient
from deepserve.errors import InvalidArgument
from deepserve.gateway.auth import Authenticator, Caller
from deepserve.gateway.cached_contexts import CachedContexts
from deepserve.gateway.demand import DemandHold
from deepserve.gateway.gateway_metrics import REQUEST_E2E, REQUEST_TPOT, REQUEST_TTFT
from deepserve.gateway.model_directory import ModelDirectory
from deepserve.gateway.responses import ResponsesService
from deepserve.gateway.settings import GatewaySettings
from deepserve.store.etcd import EtcdStore
from deepserve.tenancy.rate_limiter import Admission, RateLimiter
from deepserve.tenancy.usage import UsageMeter
from deepserve.v1 import common_pb2

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)


def _input_chars(body: ChatCompletionRequest | CompletionRequest) -> int:
    """A cheap upper bound of the text to tokenize."""
    if isinstance(body, ChatCompletionRequest):
        total = 0
        for message in body.messages:
            if isinstance(message.content, str):
                total += len(message.content)
            elif message.content:
                total += sum(len(part.text or "") for part in message.content)
        return total
    prompt = body.prompt
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(p) for p in prompt if isinstance(p, str))


class Gateway:
    """Owns the gateway's components; one per process."""

    def __init__(
        self,
        settings: GatewaySettings,
        models: ModelDirectory,
        auth: Authenticator,
        limiter: RateLimiter,
        usage: UsageMeter,
        tokenizers: TokenizerRegistry,
        scheduler: SchedulerClient,
        engines: EngineStubs,
        demand: DemandHold | None = None,
        etcd: EtcdStore | None = None,
    ) -> None:
        self.settings = settings
        self.models = models
        self.auth = auth
        self.limiter = limiter
        self.usage = usage
        self.tokenizers = tokenizers
        self.scheduler = scheduler
        self.engines = engines
        self.dispatcher = Dispatcher(
            scheduler, engines, settings.generate_retries, settings.max_migrations
        )
        # Fire-and-forget reports to the scheduler, kept referenced until they finish.
        self._background: set[asyncio.Future[None]] = set()
        # Scale from zero (holds requests for models at zero replicas) and latency reports.
        self.demand = demand
        # Responses API conversation state and explicit cached contexts (both in etcd).
        self.responses: ResponsesService | None = None
        self.contexts: CachedContexts | None = None
        if etcd is not None:
            self.responses = ResponsesService(
                self, ResponseStore(etcd, settings.response_retention_s)
            )
            self.contexts = CachedContexts(self, ContextStore(etcd))

    @classmethod
    def build(
        cls, settings: GatewaySettings, etcd: EtcdStore, redis_client: aioredis.Redis
    ) -> Gateway:
        models = ModelDirectory(etcd)
        return cls(
            settings,
            models,
            Authenticator(etcd, settings),
            RateLimiter(
                redis_client,
                window_s=settings.rate_limit_window_s,
                slot_ttl_s=settings.request_timeout_s + 30,
            ),
            UsageMeter(redis_client),
            TokenizerRegistry(settings.model_cache_dir),
            SchedulerClient(settings.scheduler_address, settings.route_timeout_s),
            EngineStubs(),
            DemandHold(
                etcd,
                models,
                scheduler_address=settings.scheduler_address,
                hold_timeout_s=settings.scale_from_zero_timeout_s,
                redis_client=redis_client,
            ),
            etcd,
        )

    async def start(self, ready_timeout_s: float = 30.0) -> None:
        # A new model's tokenizer loads when its first instance appears, not on its first request.
        self.models.instances.add_handler(
            lambda kind, _name, record: (
                self.tokenizers.preload(record.model)
                if kind == "put" and record is not None
                else None
            )
        )
        self.models.start()
        if self.demand is not None:
            self.demand.start()
        self.auth.start()
        await asyncio.wait_for(
            asyncio.gather(self.auth.wait_ready(), self.models.instances.ready.wait()),
            ready_timeout_s,
        )

    async def stop(self) -> None:
        if self.demand is not None:
            await self.demand.stop()
        await self.auth.stop()
        await self.models.stop()
        await self.scheduler.close()
        await self.engines.close()

    def authenticate(self, authorization: str | None) -> Caller:
        with _tracer.start_as_current_span("auth") as span:
            caller = self.auth.authenticate(authorization)
            span.set_attribute("tenant", caller.tenant)
            return caller

    def _estimated_tokens(self, job: GenerationJob, max_model_len: int) -> int:
        per_choice = job.sampling.max_tokens
        if per_choice is None:
            per_choice = self.settings.max_tokens_estimate
            if max_model_len:
                longest = max(len(p.token_ids) for p in job.prompts)
                per_choice = min(per_choice, max_model_len - longest)
        return job.prompt_tokens + job.fanout * max(per_choice, 0)

    async def open_call(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        caller: Caller,
        request_id: str,
    ) -> ApiCall:
        """Prepares, admits, routes and starts a call; raises a DeepServeError on refusal."""
        opened_at = time.monotonic()
        # A request names a LoRA adapter as its model: it runs on the adapter's base model.
        adapter = self._adapter_target(caller, body.model)
        if adapter is not None:
            if body.cached_context_id:
                raise InvalidArgument(
                    "cached contexts are not served with LoRA adapters", field="cached_context_id"
                )
            body = body.model_copy(update={"model": adapter[1]})
        if self.demand is not None and self.settings.scale_from_zero_timeout_s > 0:
            await self.demand.hold(body.model)  # a model at zero replicas: wait for one
        self.models.get(body.model)  # 404 for a model nobody serves or registered
        tokenizer = await self.tokenizers.get(body.model)
        context = None
        if body.cached_context_id:
            if self.contexts is None:
                raise InvalidArgument(
                    "cached contexts are not served here", field="cached_context_id"
                )
            context = await self.contexts.prefix(caller.tenant, body.cached_context_id, body.model)
        live = self.models.live_instances(body.model)
        max_model_len = min((i.max_model_len for i in live if i.max_model_len), default=0)
        prepare = functools.partial(
            prepare_chat if isinstance(body, ChatCompletionRequest) else prepare_completion,
            body,  # type: ignore[arg-type]
            tokenizer,
            request_id=request_id,
            tenant=caller.tenant,
            max_model_len=max_model_len,
            # Hashed the way the model's engines cache: their block size, from their records.
            block_size=prefix_block_size(body.model, live),
            tool_parser=self.settings.tool_parsers.get(body.model, self.settings.tool_parser),
            context=context,
            adapter=adapter[0] if adapter is not None else None,
        )
        # Short prompts tokenize in well under a millisecond; long ones would stall the loop.
        with _tracer.start_as_current_span("tokenize") as span:
            job = await asyncio.to_thread(prepare) if _input_chars(body) > 32_000 else prepare()
            span.set_attribute("prompt_tokens", job.prompt_tokens)
        if job.fanout > self.settings.max_fanout:
            raise InvalidArgument(
                f"n times the number of prompts is {job.fanout}, more than {self.settings.max_fanout}",
                field="n",
            )
        job.created = int(time.time())
        job.deadline = asyncio.get_running_loop().time() + self.settings.request_timeout_s
        with _tracer.start_as_current_span("admit_and_route") as span:
            admission, instances = await self._admit_and_route(job, caller, max_model_len)
            span.set_attribute("route.instances", [t.instance.instance_id for t in instances])
        call = ApiCall(
            job,
            tokenizer,
            self.dispatcher.stream(job, instances),
            lambda c: self._account(c, admission),
        )
        call.opened_at = opened_at
        try:
            await call.start()
        except BaseException:
            await call.close()
            raise
        call.first_token_at = time.monotonic()
        REQUEST_TTFT.labels(job.model).observe(call.first_token_at - opened_at)
        if self.demand is not None:
            self.demand.started(call, opened_at)
        return call

    def _adapter_target(self, caller: Caller, model: str) -> tuple[AdapterTarget, str] | None:
        """The caller's adapter named `model` and its base; another tenant's is not found."""
        record = self.models.adapter_for(caller.tenant, model)
        if record is None:
            return None
        return AdapterTarget(record.serving_id, record.path, record.name), record.base_model

    async def _admit_and_route(
        self, job: GenerationJob, caller: Caller, max_model_len: int
    ) -> tuple[Admission, list[common_pb2.Instance]]:
        """Rate-limit admission and routing, overlapped: they are independent round trips."""
        estimate = self._estimated_tokens(job, max_model_len)
        admit = self.limiter.admit(caller.tenant, job.request_id, caller.limits, estimate)
        if caller.limits.unlimited:  # no Redis trip to overlap with
            admission = await admit
            try:
                return admission, await self.dispatcher.route_all(job)
            except BaseException:
                await self.limiter.finish(admission, 0)
                raise
        routing = asyncio.ensure_future(self.dispatcher.route_all(job))
        try:
            admission = await admit
        except BaseException:
            routing.cancel()
            with contextlib.suppress(BaseException):
                await routing
            raise
        try:
            return admission, await routing
        except BaseException:
            await self.limiter.finish(admission, 0)
            raise

    async def _account(self, call: ApiCall, admission: Admission) -> None:
        if self.demand is not None:
            await self.demand.finished(call)
        usage = call.usage()
        self._observe_latency(call, usage.completion_tokens)
        self._report_completion(call)
        await asyncio.gather(
            self.limiter.finish(admission, usage.total_tokens),
            self.usage.record(
                call.job.tenant, call.job.model, usage.prompt_tokens, usage.completion_tokens
            )
            if usage.total_tokens
            else asyncio.sleep(0),
        )

    @staticmethod
    def _observe_latency(call: ApiCall, completion_tokens: int) -> None:
        if call.first_token_at is None or not call.completed:
            return
        now = time.monotonic()
        REQUEST_E2E.labels(call.job.model).observe(now - call.opened_at)
        per_choice = completion_tokens / max(1, call.job.fanout)
        if per_choice > 1:
            REQUEST_TPOT.labels(call.job.model).observe(
                (now - call.first_token_at) / (per_choice - 1)
            )

    def _report_completion(self, call: ApiCall) -> None:
        """Tells the scheduler how long each choice ran, for its decode-length predictor."""
        job = call.job
        for index, choice in enumerate(call.choices):
            if not choice.finished:
                continue
            task = asyncio.ensure_future(
                self.dispatcher.report_completion(
                    job, job.prompts[index // job.n], choice.completion_tokens
                )
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)
