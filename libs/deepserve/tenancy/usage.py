"""Token usage per tenant and model, accumulated in Redis counters."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis.asyncio as aioredis

from deepserve.store.redis_keys import RedisKeys
from deepserve.store.redis_messages import BadMessage, UsageCounts, UsageIndexEntry

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Totals of one tenant on one model."""

    tenant: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class UsageMeter:
    """Adds finished requests to the counters and reads them back."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client

    async def record(
        self, tenant: str, model: str, prompt_tokens: int, completion_tokens: int
    ) -> None:
        key = RedisKeys.usage(tenant, model)
        added = UsageCounts(
            requests=1, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
        )
        async with self._client.pipeline(transaction=False) as pipe:
            for counter, amount in added.encode().items():
                pipe.hincrby(key, counter, amount)
            pipe.sadd(RedisKeys.usage_index(), UsageIndexEntry(tenant, model).encode())
            await pipe.execute()

    async def read(self, tenant: str | None = None, model: str | None = None) -> list[UsageRow]:
        chosen: list[UsageIndexEntry] = []
        for member in await self._client.smembers(RedisKeys.usage_index()):
            try:
                entry = UsageIndexEntry.decode(member)
            except BadMessage as exc:
                log.warning("skipping a usage index entry: %s", exc)
                continue
            if (tenant is None or entry.tenant == tenant) and (
                model is None or entry.model == model
            ):
                chosen.append(entry)
        if not chosen:
            return []
        chosen.sort(key=lambda e: (e.tenant, e.model))
        async with self._client.pipeline(transaction=False) as pipe:
            for entry in chosen:
                pipe.hgetall(RedisKeys.usage(entry.tenant, entry.model))
            totals = await pipe.execute()
        rows: list[UsageRow] = []
        for entry, raw in zip(chosen, totals, strict=True):
            counts = UsageCounts.decode(raw)
            rows.append(
                UsageRow(
                    tenant=entry.tenant,
                    model=entry.model,
                    requests=counts.requests,
                    prompt_tokens=counts.prompt_tokens,
                    completion_tokens=counts.completion_tokens,
                )
            )
        return rows
