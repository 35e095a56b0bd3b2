"""The Redis key space: every key the platform writes to Redis is built here and nowhere else.

Redis holds hot state that may be lost without harming correctness (etcd holds the rest, see
`deepserve.store.keys`). Every key starts with `deepserve:`:

    deepserve:load:<instance id>                 an instance's latest load report (string, TTL)
    deepserve:kv-events:<instance id>            an instance's KV events (stream)
    deepserve:routed:<instance id>               requests routed since each load report (hash)
    deepserve:suspect:<instance id>              an instance a caller saw fail (string, TTL)
    deepserve:decode-history:<model>:<tenant>    decode-length histogram (hash; both quoted)
    deepserve:latency:<model>                    recent request latencies, newest first (list)
    deepserve:usage:index                        the (tenant, model) pairs with usage (set)
    deepserve:usage:{<tenant>}:<model>           a tenant's token usage on a model (hash)
    deepserve:rl:{<tenant>}:req|tok|tokn|conc    a tenant's rate-limit windows (zsets, hash)

A `{...}` segment is a Redis Cluster hash tag: every key of one tenant lands in one slot, so the
rate limiter's Lua script may touch all four of them at once.
"""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import quote

ROOT = "deepserve:"
_KV_EVENTS = ROOT + "kv-events:"


class RateLimitKeys(NamedTuple):
    """The four keys of one tenant's limits, in the order the limiter's scripts take them."""

    # Sliding-window log of admitted requests (zset: entry id -> admitted at, ms).
    requests: str
    # Sliding-window log of token charges (zset: entry id -> charged at, ms).
    tokens: str
    # Tokens charged per entry (hash: entry id -> tokens).
    token_counts: str
    # Concurrency slots (zset: entry id -> slot deadline, ms).
    concurrency: str


class RedisKeys:
    """Key builders for every Redis key of the platform."""

    @staticmethod
    def load(instance_id: str) -> str:
        return f"{ROOT}load:{instance_id}"

    @staticmethod
    def kv_events(instance_id: str) -> str:
        return _KV_EVENTS + instance_id

    @staticmethod
    def kv_events_instance(stream: str) -> str:
        """The instance id a KV-event stream key belongs to (the inverse of `kv_events`)."""
        if not stream.startswith(_KV_EVENTS):
            raise ValueError(f"{stream!r} is not a KV-event stream key")
        return stream[len(_KV_EVENTS) :]

    @staticmethod
    def routed(instance_id: str) -> str:
        return f"{ROOT}routed:{instance_id}"

    @staticmethod
    def suspect(instance_id: str) -> str:
        return f"{ROOT}suspect:{instance_id}"

    @staticmethod
    def decode_history(model: str, tenant: str) -> str:
        # Quoted: a model name may hold ':' (and the tenant may be empty: the model's total).
        return f"{ROOT}decode-history:{quote(model, safe='')}:{quote(tenant, safe='')}"

    @staticmethod
    def latency(model: str) -> str:
        return f"{ROOT}latency:{model}"

    @staticmethod
    def usage_index() -> str:
        return f"{ROOT}usage:index"

    @staticmethod
    def usage(tenant: str, model: str) -> str:
        return f"{ROOT}usage:{{{tenant}}}:{model}"

    @staticmethod
    def rate_limit(tenant: str) -> RateLimitKeys:
        base = f"{ROOT}rl:{{{tenant}}}"
        return RateLimitKeys(f"{base}:req", f"{base}:tok", f"{base}:tokn", f"{base}:conc")
