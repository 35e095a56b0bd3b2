"""Runs one batch line (a /v1/chat/completions body) through scheduler.Route and FlowServe.

The same path as the gateway's (chat template, tokenization, routing, Generate, the OpenAI
response body), reusing its framework-free modules, but at the batch priority and with no
rate limiting: a batch is admitted once, as a whole, when it is created. Its tokens count in
the tenant's usage like interactive ones.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pydantic

from deepserve import records
from deepserve.completions.call import ApiCall
from deepserve.completions.dispatcher import Dispatcher
from deepserve.completions.openai_errors import body_for
from deepserve.completions.prepare import prefix_block_size, prepare_chat
from deepserve.completions.protocol import ChatCompletionRequest
from deepserve.completions.response_format import ResponseFormatter
from deepserve.completions.tokenizer_registry import TokenizerRegistry
from deepserve.completions.upstream import EngineStubs, SchedulerClient
from deepserve.errors import (
    DeepServeError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from deepserve.jobmgr.batch.settings import BatchSettings
from deepserve.records import InstanceRecord
from deepserve.store.etcd import EtcdStore
from deepserve.tenancy.usage import UsageMeter

RETRYABLE = (Unavailable, ResourceExhausted)


@dataclass(frozen=True, slots=True)
class LineResult:
    """One line's outcome: the output (or error) file line, and whether it succeeded."""

    index: int
    custom_id: str
    ok: bool
    line: dict[str, Any]


def result_line(
    custom_id: str, request_id: str, status: int, body: dict[str, Any]
) -> dict[str, Any]:
    """OpenAI's batch output/error line."""
    return {
        "id": f"batch_req_{uuid.uuid4().hex[:24]}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": body},
        "error": None,
    }


def expired_line(custom_id: str) -> dict[str, Any]:
    """The error-file line of a request the completion window closed on (OpenAI's shape)."""
    return {
        "id": f"batch_req_{uuid.uuid4().hex[:24]}",
        "custom_id": custom_id,
        "response": None,
        "error": {
            "code": "batch_expired",
            "message": "This request could not be executed before the completion window expired.",
        },
    }


class BatchLineRunner:
    """Sends batch lines to the serving instances; one per jobmgr process."""

    def __init__(
        self,
        etcd: EtcdStore,
        settings: BatchSettings,
        live_instances: Callable[[str], Sequence[InstanceRecord]],
        tokenizers: TokenizerRegistry | None = None,
        usage: UsageMeter | None = None,
    ) -> None:
        self._etcd = etcd
        self._usage = usage
        self.settings = settings
        # The live instances of a model (jobmgr's instance mirror): their records give the
        # context window to check prompts against and the block size to hash them with.
        self._live_instances = live_instances
        self._tokenizers = tokenizers or TokenizerRegistry()
        self._engines = EngineStubs()
        self._scheduler: SchedulerClient | None = None
        self._scheduler_address = ""

    async def _dispatcher(self) -> Dispatcher:
        address = self.settings.scheduler_address or await self._discover_scheduler()
        if self._scheduler is None or address != self._scheduler_address:
            if self._scheduler is not None:
                await self._scheduler.close()
            self._scheduler = SchedulerClient(address, self.settings.route_timeout_s)
            self._scheduler_address = address
        return Dispatcher(
            self._scheduler, self._engines, max_migrations=self.settings.max_migrations
        )

    async def _discover_scheduler(self) -> str:
        found, _ = await records.services(self._etcd, "scheduler").list()
        live = sorted((s.record for s in found), key=lambda r: r.started_at)
        if not live:
            raise Unavailable("no scheduler is registered")
        if self._scheduler_address in {r.address for r in live}:
            return self._scheduler_address
        return live[0].address

    async def run(self, index: int, line: dict[str, Any], tenant: str) -> LineResult:
        """Runs the line (retrying what may pass later); never raises for the line's own fault."""
        custom_id = str(line.get("custom_id", ""))
        request_id = f"{custom_id}-{uuid.uuid4().hex[:12]}"
        for attempt in range(1, self.settings.attempts + 1):
            try:
                body = await self._complete(line, tenant, request_id)
            except RETRYABLE as exc:
                if attempt == self.settings.attempts:
                    return self._failed(index, custom_id, request_id, exc)
                await asyncio.sleep(self.settings.retry_delay_s * attempt)
            except DeepServeError as exc:
                return self._failed(index, custom_id, request_id, exc)
            else:
                return LineResult(
                    index, custom_id, True, result_line(custom_id, request_id, 200, body)
                )
        raise AssertionError("unreachable")

    @staticmethod
    def _failed(index: int, custom_id: str, request_id: str, exc: DeepServeError) -> LineResult:
        status, body = body_for(exc)
        return LineResult(index, custom_id, False, result_line(custom_id, request_id, status, body))

    async def _complete(self, line: dict[str, Any], tenant: str, request_id: str) -> dict[str, Any]:
        try:
            body = ChatCompletionRequest.model_validate(line.get("body"))
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "body"
            raise InvalidArgument(first["msg"], field=field) from None
        if body.stream:
            raise InvalidArgument("streaming is not supported in a batch", field="stream")
        body.priority = self.settings.priority
        tokenizer = await self._tokenizers.get(body.model)
        live = self._live_instances(body.model)
        job = prepare_chat(
            body,
            tokenizer,
            request_id=request_id,
            tenant=tenant,
            max_model_len=min((i.max_model_len for i in live if i.max_model_len), default=0),
            block_size=prefix_block_size(body.model, live),
        )
        job.created = int(time.time())
        job.deadline = asyncio.get_running_loop().time() + self.settings.request_timeout_s
        dispatcher = await self._dispatcher()
        targets = await dispatcher.route_all(job)

        async def finished(call: ApiCall) -> None:
            usage = call.usage()
            if self._usage is not None and usage.total_tokens:
                await self._usage.record(
                    tenant, body.model, usage.prompt_tokens, usage.completion_tokens
                )

        async with ApiCall(job, tokenizer, dispatcher.stream(job, targets), finished) as call:
            deltas = [delta async for delta in call]
        return ResponseFormatter(call).response(deltas)

    async def close(self) -> None:
        if self._scheduler is not None:
            await self._scheduler.close()
        await self._engines.close()
