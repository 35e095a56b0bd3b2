"""Explicit context caching: create, read, list and delete a tenant's cached contexts.

Creating one tokenizes its messages (rendered without a generation prompt, so a chat request
naming it continues them) or its prompt, routes it like a request (the tenant's salted prefix
hashes), and asks the chosen engine to pin it (`PinContext`): the engine computes what it does
not hold cached, or populates it from its host tier, and keeps the blocks pinned until the TTL.
The record goes to etcd on a lease of the same TTL. Requests naming the context are routed to
the instances holding it (they report their pins); an instance that gets one without holding it
pins it after computing the prompt. Deleting unpins it on every live instance of the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import grpc
from pydantic import BaseModel, ConfigDict, Field

from deepserve.completions.context_store import CachedContextRecord, ContextStore
from deepserve.completions.prepare import (
    cache_salt_for,
    encode_checked,
    message_dict,
    prefix_block_size,
    with_block_hashes,
)
from deepserve.completions.prepared import ContextPrefix, GenerationJob, Prompt
from deepserve.completions.protocol import ChatMessage
from deepserve.errors import DeepServeError, InvalidArgument
from deepserve.rpc.errors import error_from_rpc
from deepserve.sampling_params import SamplingParams
from deepserve.v1 import flowserve_pb2

log = logging.getLogger(__name__)


class CachedContextRequest(BaseModel):
    """POST /v1/cached_contexts: a prompt prefix to keep cached, from messages or a prompt."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    ttl_seconds: int | None = Field(default=None, ge=1)
    cache_salt: str | None = Field(default=None, min_length=1, max_length=256)


class CachedContexts:
    """The cached-context API of one gateway."""

    def __init__(self, gateway: Any, store: ContextStore) -> None:
        # deepserve.gateway.gateway.Gateway (typed loosely: it builds this object).
        self._gateway = gateway
        self.store = store

    async def create(self, body: CachedContextRequest, caller: Any) -> CachedContextRecord:
        gateway = self._gateway
        settings = gateway.settings
        if (body.messages is None) == (body.prompt is None):
            raise InvalidArgument("give exactly one of messages and prompt", field="messages")
        ttl = body.ttl_seconds or settings.cached_context_default_ttl_s
        if ttl > settings.cached_context_max_ttl_s:
            raise InvalidArgument(
                f"must be at most {settings.cached_context_max_ttl_s}", field="ttl_seconds"
            )
        limit = caller.limits.max_cached_contexts or settings.max_cached_contexts_per_tenant
        await self.store.check_room(caller.tenant, limit)
        gateway.models.get(body.model)
        tokenizer = await gateway.tokenizers.get(body.model)
        messages: list[dict[str, Any]] | None = None
        if body.messages is not None:
            if not body.messages:
                raise InvalidArgument("must not be empty", field="messages")
            messages = [message_dict(m, i) for i, m in enumerate(body.messages)]
            ids = encode_checked(
                tokenizer.encode_chat, "messages", messages, add_generation_prompt=False
            )
        else:
            ids = encode_checked(tokenizer.encode, "prompt", body.prompt or "")
        live = gateway.models.live_instances(body.model)
        max_model_len = min((i.max_model_len for i in live if i.max_model_len), default=0)
        if not ids:
            raise InvalidArgument("the context is empty after tokenization", field="messages")
        if max_model_len and len(ids) >= max_model_len:
            raise InvalidArgument(
                f"the context has {len(ids)} tokens; the model's context is {max_model_len}",
                field="messages" if messages is not None else "prompt",
            )
        if len(ids) > settings.cached_context_max_tokens:
            raise InvalidArgument(
                f"at most {settings.cached_context_max_tokens} tokens per cached context",
                field="messages" if messages is not None else "prompt",
            )
        context_id = "ctx_" + uuid.uuid4().hex
        created = time.time()
        record = CachedContextRecord(
            context_id=context_id,
            tenant=caller.tenant,
            model=body.model,
            token_ids=ids,
            messages=messages,
            prompt=body.prompt,
            created_at=created,
            expires_at=created + ttl,
            ttl_seconds=ttl,
        )
        record.pinned_tokens = await self._pin(
            record, cache_salt_for(caller.tenant, body.cache_salt)
        )
        return await self.store.create(record)

    async def _pin(self, record: CachedContextRecord, salt: str) -> int:
        """Routes the context like a request and pins it on the chosen instance."""
        gateway = self._gateway
        block_size = prefix_block_size(record.model, gateway.models.live_instances(record.model))
        job = GenerationJob(
            request_id=f"pin-{record.context_id}",
            endpoint="text",
            tenant=record.tenant,
            model=record.model,
            prompts=with_block_hashes([Prompt(record.token_ids)], block_size, salt),
            sampling=SamplingParams(max_tokens=1),
            block_size=max(block_size, 0),
            cache_salt=salt,
        )
        job.deadline = asyncio.get_running_loop().time() + gateway.settings.request_timeout_s
        target = await gateway.dispatcher.route(job, job.prompts[0])
        stub = gateway.engines.get(target.instance.address)
        try:
            reply = await stub.PinContext(
                flowserve_pb2.PinContextRequest(
                    context_id=record.context_id,
                    model=record.model,
                    prompt_token_ids=record.token_ids,
                    cache_salt=salt,
                    expires_at_unix=record.expires_at,
                ),
                timeout=gateway.settings.request_timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from exc
        return int(reply.pinned_tokens)

    async def prefix(self, tenant: str, context_id: str, model: str) -> ContextPrefix:
        """The context a request names, as its prompt prefix (NotFound naming the field)."""
        record = await self.store.get(tenant, context_id)
        if record.model != model:
            raise InvalidArgument(
                f"cached context {context_id!r} belongs to model {record.model!r}",
                field="cached_context_id",
            )
        return ContextPrefix(
            context_id=record.context_id,
            token_ids=record.token_ids,
            messages=record.messages,
            expires_at=record.expires_at,
        )

    async def delete(self, tenant: str, context_id: str) -> None:
        record = await self.store.delete(tenant, context_id)
        # Every live instance of the model may hold it (routed elsewhere, re-pinned there).
        addresses = {i.address for i in self._gateway.models.live_instances(record.model)}
        await asyncio.gather(*(self._unpin(a, context_id) for a in addresses))

    async def _unpin(self, address: str, context_id: str) -> None:
        # An instance that cannot be reached drops its pins at their expiry by itself.
        with contextlib.suppress(grpc.aio.AioRpcError, DeepServeError):
            await self._gateway.engines.get(address).UnpinContext(
                flowserve_pb2.UnpinContextRequest(context_id=context_id), timeout=5
            )
