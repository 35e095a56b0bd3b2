"""Recent request latencies per model in Redis: the gateway writes, the autoscaler reads.

Each finished request leaves one sample (time to first token, time per output token) in a
capped list per model; the autoscaler counts the samples of its window that miss the
deployment's SLOs. Lossy by design: a lost sample only makes one scaling decision less informed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

LATENCY_KEY = "deepserve:latency:{model}"
MAX_SAMPLES = 2000
SAMPLES_TTL_S = 600


@dataclass(frozen=True, slots=True)
class LatencySample:
    """One request as the client saw it."""

    at: float
    ttft_s: float
    # 0 when the request produced at most one token.
    tpot_s: float


async def record_latency(redis: Any, model: str, ttft_s: float, tpot_s: float) -> None:
    """Appends one sample (redis: a redis.asyncio client)."""
    key = LATENCY_KEY.format(model=model)
    sample = json.dumps([round(time.time(), 3), round(ttft_s, 4), round(tpot_s, 5)])
    async with redis.pipeline(transaction=False) as pipe:
        pipe.lpush(key, sample)
        pipe.ltrim(key, 0, MAX_SAMPLES - 1)
        pipe.expire(key, SAMPLES_TTL_S)
        await pipe.execute()


async def read_latency(redis: Any, model: str, window_s: float) -> list[LatencySample]:
    """The samples of the last `window_s` seconds, newest first."""
    raw = await redis.lrange(LATENCY_KEY.format(model=model), 0, MAX_SAMPLES - 1)
    cutoff = time.time() - window_s
    samples = []
    for item in raw:
        try:
            at, ttft, tpot = json.loads(item)
        except (ValueError, TypeError):
            continue
        if at < cutoff:
            break  # newest first: the rest are older still
        samples.append(LatencySample(float(at), float(ttft), float(tpot)))
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
