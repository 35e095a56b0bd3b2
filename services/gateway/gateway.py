"""The request path both APIs share: authenticate, check the model, tokenize, admit, route, run.

HTTP (`http_app`) and gRPC (`servicer`) translate their wire types into the OpenAI request
models and call `Gateway.open_call`; what comes back is an `ApiCall` that has already routed and
received its first token.
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis

from deepserve.config import GatewaySettings
from deepserve.errors import InvalidArgument
from deepserve.gateway.auth import Authenticator, Caller
from deepserve.gateway.call import ApiCall
from deepserve.gateway.dispatcher import Dispatcher
from deepserve.gateway.job import GenerationJob
from deepserve.gateway.model_directory import ModelDirectory
from deepserve.gateway.openai_protocol import ChatCompletionRequest, CompletionRequest
from deepserve.gateway.prepare import prepare_chat, prepare_completion
from deepserve.gateway.tokenizer_registry import TokenizerRegistry
from deepserve.gateway.upstream import EngineStubs, SchedulerClient
from deepserve.store.etcd import EtcdStore
from deepserve.tenancy.rate_limiter import Admission, RateLimiter
from deepserve.tenancy.usage import UsageMeter

log = logging.getLogger(__name__)


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
    ) -> None:
        self.settings = settings
        self.models = models
        self.auth = auth
        self.limiter = limiter
        self.usage = usage
        self.tokenizers = tokenizers
        self.scheduler = scheduler
        self.engines = engines
        self.dispatcher = Dispatcher(scheduler, engines, settings.generate_retries)

    @classmethod
    def build(
        cls, settings: GatewaySettings, etcd: EtcdStore, redis_client: aioredis.Redis
    ) -> Gateway:
        return cls(
            settings,
            ModelDirectory(etcd),
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
        )

    async def start(self, ready_timeout_s: float = 30.0) -> None:
        self.models.start()
        self.auth.start()
        await asyncio.wait_for(
            asyncio.gather(self.auth.wait_ready(), self.models.instances.ready.wait()),
            ready_timeout_s,
        )

    async def stop(self) -> None:
        await self.auth.stop()
        await self.models.stop()
        await self.scheduler.close()
        await self.engines.close()

    def authenticate(self, authorization: str | None) -> Caller:
        return self.auth.authenticate(authorization)

    def _max_model_len(self, model: str) -> int:
        lengths = [i.max_model_len for i in self.models.live_instances(model) if i.max_model_len]
        return min(lengths, default=0)

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
        self.models.get(body.model)  # 404 for a model nobody serves or registered
        tokenizer = await self.tokenizers.get(body.model)
        max_model_len = self._max_model_len(body.model)
        prepare = prepare_chat if isinstance(body, ChatCompletionRequest) else prepare_completion
        job = prepare(
            body,  # type: ignore[arg-type]
            tokenizer,
            request_id=request_id,
            tenant=caller.tenant,
            max_model_len=max_model_len,
            block_size=self.settings.prefix_block_size,
        )
        if job.fanout > self.settings.max_fanout:
            raise InvalidArgument(
                f"n times the number of prompts is {job.fanout}, more than {self.settings.max_fanout}",
                field="n",
            )
        job.created = int(time.time())
        job.deadline = asyncio.get_running_loop().time() + self.settings.request_timeout_s
        admission = await self.limiter.admit(
            caller.tenant, request_id, caller.limits, self._estimated_tokens(job, max_model_len)
        )
        try:
            instances = await self.dispatcher.route_all(job)
        except BaseException:
            await self.limiter.finish(admission, 0)
            raise
        call = ApiCall(
            job,
            tokenizer,
            self.dispatcher.stream(job, instances),
            lambda c: self._account(c, admission),
        )
        try:
            await call.start()
        except BaseException:
            await call.close()
            raise
        return call

    async def _account(self, call: ApiCall, admission: Admission) -> None:
        usage = call.usage()
        await asyncio.gather(
            self.limiter.finish(admission, usage.total_tokens),
            self.usage.record(
                call.job.tenant, call.job.model, usage.prompt_tokens, usage.completion_tokens
            )
            if usage.total_tokens
            else asyncio.sleep(0),
        )
