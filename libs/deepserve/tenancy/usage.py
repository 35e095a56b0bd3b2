"""Token usage per tenant and model, accumulated in Redis counters."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

USAGE_INDEX = "deepserve:usage:index"
_SEP = "\x1f"


def _usage_key(tenant: str, model: str) -> str:
    return f"deepserve:usage:{{{tenant}}}:{model}"


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
        key = _usage_key(tenant, model)
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.hincrby(key, "requests", 1)
            pipe.hincrby(key, "prompt_tokens", prompt_tokens)
            pipe.hincrby(key, "completion_tokens", completion_tokens)
            pipe.sadd(USAGE_INDEX, f"{tenant}{_SEP}{model}")
            await pipe.execute()

    async def read(self, tenant: str | None = None, model: str | None = None) -> list[UsageRow]:
        members = await self._client.smembers(USAGE_INDEX)
        pairs = sorted(
            tuple((m.decode() if isinstance(m, bytes) else m).split(_SEP, 1)) for m in members
        )
        chosen = [
            (t, m)
            for t, m in pairs
            if (tenant is None or t == tenant) and (model is None or m == model)
        ]
        if not chosen:
            return []
        async with self._client.pipeline(transaction=False) as pipe:
            for t, m in chosen:
                pipe.hgetall(_usage_key(t, m))
            totals = await pipe.execute()
        rows: list[UsageRow] = []
        for (t, m), raw in zip(chosen, totals, strict=True):
            values = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}
            rows.append(
                UsageRow(
                    tenant=t,
                    model=m,
                    requests=values.get("requests", 0),
                    prompt_tokens=values.get("prompt_tokens", 0),
                    completion_tokens=values.get("completion_tokens", 0),
                )
            )
        return rows
