"""Shares the decode-length histories between scheduler replicas through Redis.

A finished request adds one to its bucket in Redis (a hash per model and tenant); every replica
re-reads the histograms it uses every `refresh_s`, so all replicas predict alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from urllib.parse import quote

from deepserve.scheduler.decode_predictor import DecodeLengthPredictor
from deepserve.store.redis_store import RedisStore

log = logging.getLogger(__name__)

HISTORY_KEY = "deepserve:decode-history:{model}:{tenant}"
HISTORY_TTL_S = 7 * 24 * 3600


def history_key(model: str, tenant: str) -> str:
    return HISTORY_KEY.format(model=quote(model, safe=""), tenant=quote(tenant, safe=""))


class HistorySync:
    """Pushes observed buckets to Redis and pulls the shared histograms back."""

    def __init__(
        self, redis: RedisStore, predictor: DecodeLengthPredictor, *, refresh_s: float = 1.0
    ) -> None:
        self._redis = redis
        self._predictor = predictor
        self._refresh_s = refresh_s
        self._pending: Counter[tuple[str, str, int]] = Counter()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="decode-history-sync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def observed(self, model: str, tenant: str, bucket: int) -> None:
        self._pending[(model, tenant, bucket)] += 1
        if tenant:
            self._pending[(model, "", bucket)] += 1

    async def sync_once(self) -> None:
        client = self._redis.client
        pending, self._pending = self._pending, Counter()
        async with client.pipeline(transaction=False) as pipe:
            for (model, tenant, bucket), count in pending.items():
                key = history_key(model, tenant)
                pipe.hincrby(key, str(bucket), count)
                pipe.expire(key, HISTORY_TTL_S)
            await pipe.execute()
        keys = sorted(set(self._predictor.histograms) | self._predictor.wanted)
        if not keys:
            return
        async with client.pipeline(transaction=False) as pipe:
            for model, tenant in keys:
                pipe.hgetall(history_key(model, tenant))
            replies = await pipe.execute()
        for (model, tenant), reply in zip(keys, replies, strict=True):
            if reply:
                self._predictor.replace_history(
                    model, tenant, Counter({int(k): int(v) for k, v in reply.items()})
                )

    async def _run(self) -> None:
        while True:
            try:
                await self.sync_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("syncing decode histories failed: %s", exc)
            await asyncio.sleep(self._refresh_s)
