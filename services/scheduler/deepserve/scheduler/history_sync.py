"""Shares the decode-length histories between scheduler replicas through Redis.

A finished request adds one to its bucket in Redis (a hash per model and tenant); every replica
re-reads the histograms it uses every `refresh_s`, so all replicas predict alike.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, defaultdict

from deepserve.background import stop_task
from deepserve.scheduler.decode_predictor import DecodeLengthPredictor
from deepserve.store.redis_keys import RedisKeys
from deepserve.store.redis_messages import BadMessage, DecodeHistory
from deepserve.store.redis_store import RedisStore

log = logging.getLogger(__name__)

HISTORY_TTL_S = 7 * 24 * 3600


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
        await stop_task(self._task)

    def observed(self, model: str, tenant: str, bucket: int) -> None:
        self._pending[(model, tenant, bucket)] += 1
        if tenant:
            self._pending[(model, "", bucket)] += 1

    async def sync_once(self) -> None:
        client = self._redis.client
        pending, self._pending = self._pending, Counter()
        added: dict[tuple[str, str], dict[int, int]] = defaultdict(dict)
        for (model, tenant, bucket), count in pending.items():
            added[(model, tenant)][bucket] = count
        async with client.pipeline(transaction=False) as pipe:
            for (model, tenant), buckets in added.items():
                key = RedisKeys.decode_history(model, tenant)
                for field, count in DecodeHistory(buckets).encode().items():
                    pipe.hincrby(key, field, count)
                pipe.expire(key, HISTORY_TTL_S)
            await pipe.execute()
        keys = sorted(set(self._predictor.histograms) | self._predictor.wanted)
        if not keys:
            return
        async with client.pipeline(transaction=False) as pipe:
            for model, tenant in keys:
                pipe.hgetall(RedisKeys.decode_history(model, tenant))
            replies = await pipe.execute()
        for (model, tenant), reply in zip(keys, replies, strict=True):
            if not reply:
                continue
            try:
                history = DecodeHistory.decode(reply)
            except BadMessage as exc:
                log.warning("bad decode history of %s/%s: %s", model, tenant, exc)
                continue
            self._predictor.replace_history(model, tenant, Counter(history.buckets))

    async def _run(self) -> None:
        while True:
            try:
                await self.sync_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("syncing decode histories failed: %s", exc)
            await asyncio.sleep(self._refresh_s)
