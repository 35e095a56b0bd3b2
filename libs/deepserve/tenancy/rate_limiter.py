"""Per-tenant rate limits in Redis, exact across any number of gateway replicas.

Three limits per tenant: requests per minute, tokens per minute, concurrent requests. Each is a
sliding-window log (a sorted set of request ids scored by time), checked and updated by one Lua
script, so two gateways admitting at the same moment cannot both take the last slot. A request
is admitted only if every limit has room; otherwise nothing is recorded and the caller gets
the seconds until the limit that refused it frees up.

Tokens are charged up front with an estimate (prompt + max_tokens, as OpenAI does) and
corrected to the real count when the request finishes. Concurrency slots carry a deadline, so a
gateway that dies mid-request cannot leak them forever. Times come from the Redis server's
clock (TIME), never from the gateways', so replicas with skewed clocks still agree. If Redis
cannot be reached, requests are let in unchecked (logged): Redis is lossy-tolerable state.
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from deepserve.errors import ResourceExhausted
from deepserve.store.redis_keys import RedisKeys
from deepserve.store.redis_messages import (
    AdmitRequest,
    AdmitVerdict,
    FinishRequest,
    LimitRefusal,
)
from deepserve.tenancy.tenants import TenantLimits

log = logging.getLogger(__name__)

# KEYS: RateLimitKeys (requests zset, tokens zset, tokens hash (id -> tokens), concurrency zset)
# ARGV: AdmitRequest (entry id, rpm, tpm, max concurrent, estimated tokens, window ms, slot ttl ms)
# Returns an AdmitVerdict: {0, 0} when admitted, else {refusing limit (a LimitRefusal),
# milliseconds until it has room}.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id = ARGV[1]
local rpm = tonumber(ARGV[2])
local tpm = tonumber(ARGV[3])
local conc = tonumber(ARGV[4])
local est = tonumber(ARGV[5])
local window = tonumber(ARGV[6])
local ttl = tonumber(ARGV[7])
local cutoff = now - window
-- This admission's entries are already here (a retry after a timeout whose first run landed):
-- admitted, nothing counted twice. Entry ids are unique per admission, never the client's.
if (conc > 0 and redis.call('ZSCORE', KEYS[4], id))
    or (rpm > 0 and redis.call('ZSCORE', KEYS[1], id))
    or (tpm > 0 and redis.call('HEXISTS', KEYS[3], id) == 1) then
  return {0, 0}
end
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
  local count = redis.call('ZCARD', KEYS[1])
  if count >= rpm then
    local oldest = redis.call('ZRANGE', KEYS[1], count - rpm, count - rpm, 'WITHSCORES')
    return {1, tonumber(oldest[2]) + window - now}
  end
end
if tpm > 0 then
  if est > tpm then
    return {4, window}
  end
  local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cutoff)
  for _, member in ipairs(expired) do
    redis.call('HDEL', KEYS[3], member)
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cutoff)
  local used = 0
  for _, v in ipairs(redis.call('HVALS', KEYS[3])) do
    used = used + tonumber(v)
  end
  if used + est > tpm then
    local need = used + est - tpm
    local freed = 0
    local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
    for i = 1, #entries, 2 do
      freed = freed + tonumber(redis.call('HGET', KEYS[3], entries[i]) or '0')
      if freed >= need then
        return {2, tonumber(entries[i + 1]) + window - now}
      end
    end
    return {2, window}
  end
end
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  if redis.call('ZCARD', KEYS[4]) >= conc then
    local first = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
    return {3, math.min(1000, tonumber(first[2]) - now)}
  end
end
if rpm > 0 then
  redis.call('ZADD', KEYS[1], now, id)
  redis.call('PEXPIRE', KEYS[1], window)
end
if tpm > 0 then
  redis.call('ZADD', KEYS[2], now, id)
  redis.call('HSET', KEYS[3], id, est)
  redis.call('PEXPIRE', KEYS[2], window)
  redis.call('PEXPIRE', KEYS[3], window)
end
if conc > 0 then
  redis.call('ZADD', KEYS[4], now + ttl, id)
  redis.call('PEXPIRE', KEYS[4], ttl)
end
return {0, 0}
"""

# KEYS: tokens hash, concurrency zset. ARGV: FinishRequest (entry id, actual tokens).
# The token entry is corrected only while it is still inside the window (HSET XX semantics).
_FINISH = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
redis.call('ZREM', KEYS[2], ARGV[1])
return 0
"""

_REFUSALS = {
    LimitRefusal.REQUESTS_PER_MIN: ("requests per minute", "requests_per_min"),
    LimitRefusal.TOKENS_PER_MIN: ("tokens per minute", "tokens_per_min"),
    LimitRefusal.CONCURRENCY: ("concurrent requests", "max_concurrent"),
    LimitRefusal.LARGER_THAN_TOKENS_PER_MIN: ("tokens per minute", "tokens_per_min"),
}


@dataclass(slots=True)
class Admission:
    """A request let in by the limiter; `finish` releases its slot and corrects its tokens."""

    tenant: str
    request_id: str
    limits: TenantLimits
    estimated_tokens: int
    # The id of this admission's entries in Redis: the request id made unique per admission,
    # since the request id can come from the client (x-request-id) and repeat.
    entry_id: str = ""
    finished: bool = False


class RateLimiter:
    """Admits or refuses requests against a tenant's limits."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        window_s: float = 60.0,
        slot_ttl_s: float = 600.0,
    ) -> None:
        self._admit = client.register_script(_ADMIT)
        self._finish = client.register_script(_FINISH)
        self.window_ms = int(window_s * 1000)
        self.slot_ttl_ms = int(slot_ttl_s * 1000)

    async def admit(
        self, tenant: str, request_id: str, limits: TenantLimits, estimated_tokens: int
    ) -> Admission:
        """Takes room for one request or raises ResourceExhausted with retry_after_s."""
        entry_id = f"{request_id}:{uuid.uuid4().hex[:12]}"
        admission = Admission(tenant, request_id, limits, max(0, estimated_tokens), entry_id)
        if limits.unlimited:
            return admission
        # One hash tag per tenant keeps the four keys in one Redis Cluster slot.
        keys = list(RedisKeys.rate_limit(tenant))
        args = AdmitRequest(
            entry_id=entry_id,
            requests_per_min=limits.requests_per_min,
            tokens_per_min=limits.tokens_per_min,
            max_concurrent=limits.max_concurrent,
            estimated_tokens=admission.estimated_tokens,
            window_ms=self.window_ms,
            slot_ttl_ms=self.slot_ttl_ms,
        ).encode()
        try:
            try:
                reply = await self._admit(keys=keys, args=args)
            except RedisTimeoutError as exc:
                # A stall, not an outage: ask once more before letting the request in
                # unchecked. Safe to repeat: the script admits an entry id it already holds
                # without counting it again, so a first run that did land is not doubled.
                log.warning("rate limiter timed out for %s, asking again: %s", request_id, exc)
                reply = await self._admit(keys=keys, args=args)
        except RedisError as exc:
            # Redis holds lossy state: without it, serve unlimited rather than refuse everyone
            # (the engines' own queue bounds still protect them).
            log.warning("rate limiter unavailable, admitting %s unchecked: %s", request_id, exc)
            admission.finished = True
            return admission
        verdict = AdmitVerdict.decode(reply)
        if verdict.admitted:
            return admission
        what, field = _REFUSALS[verdict.refusal]
        retry_after_s = max(1, math.ceil(verdict.wait_ms / 1000))
        if verdict.refusal == LimitRefusal.LARGER_THAN_TOKENS_PER_MIN:
            message = (
                f"request needs about {admission.estimated_tokens} tokens, more than the "
                f"tenant's limit of {limits.tokens_per_min} {what}; lower max_tokens"
            )
        else:
            message = f"rate limit reached for tenant {tenant!r}: {what}"
        raise ResourceExhausted(message, field=field, retry_after_s=retry_after_s)

    async def finish(self, admission: Admission, actual_tokens: int) -> None:
        """Releases the concurrency slot and charges the real token count; idempotent."""
        if admission.finished:
            return
        admission.finished = True
        if admission.limits.unlimited:
            return
        keys = RedisKeys.rate_limit(admission.tenant)
        args = FinishRequest(admission.entry_id, actual_tokens).encode()
        try:
            await self._finish(keys=[keys.token_counts, keys.concurrency], args=args)
        except RedisError as exc:  # the slot expires by itself (slot_ttl_s)
            log.warning("rate limiter could not release %s: %s", admission.request_id, exc)
