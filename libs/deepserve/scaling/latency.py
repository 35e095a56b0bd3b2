"""Recent request latencies per model in Redis: the gateway writes, the autoscaler reads.

Each finished request leaves one `LatencySample` (time to first token, time per output token)
in a capped list per model; the autoscaler counts the samples of its window that miss the
deployment's SLOs. Lossy by design: a lost sample only makes one scaling decision less informed.
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from deepserve.store.redis_keys import RedisKeys
from deepserve.store.redis_messages import BadMessage, LatencySample

MAX_SAMPLES = 2000
SAMPLES_TTL_S = 600

__all__ = ["LatencySample", "miss_fractions", "read_latency", "record_latency"]


async def record_latency(redis: aioredis.Redis, model: str, ttft_s: float, tpot_s: float) -> None:
    """Appends one sample, stamped now."""
    key = RedisKeys.latency(model)
    sample = LatencySample(at=time.time(), ttft_s=ttft_s, tpot_s=tpot_s)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.lpush(key, sample.encode())
        pipe.ltrim(key, 0, MAX_SAMPLES - 1)
        pipe.expire(key, SAMPLES_TTL_S)
        await pipe.execute()


async def read_latency(redis: aioredis.Redis, model: str, window_s: float) -> list[LatencySample]:
    """The samples of the last `window_s` seconds, newest first."""
    raw = await redis.lrange(RedisKeys.latency(model), 0, MAX_SAMPLES - 1)  # type: ignore[misc]
    cutoff = time.time() - window_s
    samples = []
    for item in raw:
        try:
            sample = LatencySample.decode(item)
        except BadMessage:
            continue
        if sample.at < cutoff:
            break  # newest first: the rest are older still
        samples.append(sample)
    return samples


def miss_fractions(
    samples: list[LatencySample], ttft_slo_s: float, tpot_slo_s: float
) -> tuple[float, float]:
    """Fractions of samples over the TTFT and over the TPOT objective (0 disables one)."""
    if not samples:
        return 0.0, 0.0
    ttft = sum(1 for s in samples if ttft_slo_s > 0 and s.ttft_s > ttft_slo_s)
    tpot = sum(1 for s in samples if tpot_slo_s > 0 and s.tpot_s > tpot_slo_s)
    return ttft / len(samples), tpot / len(samples)
