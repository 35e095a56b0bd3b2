"""The messages that cross Redis between processes, each with its one explicit encoding.

Every value one process writes to Redis and another reads back is one of these types; the key
it lives under comes from `deepserve.store.redis_keys`. Producers call `encode`, consumers call
`decode`, which raises `BadMessage` for a value that is not the message it should be (Redis is
lossy-tolerable state: a consumer logs and skips it). Unknown JSON fields are ignored, so a
producer may add a field before every consumer knows it.

    LoadReport        pod shell -> scheduler load tracker, jobmgr autoscaler
    KVEventEntry      pod shell (engine KV-cache events) -> scheduler KV-event feed
    RoutedSince       scheduler replica -> scheduler replicas
    SuspectInstance   scheduler replica (told by a gateway) -> scheduler replicas
    DecodeHistory     scheduler replica -> scheduler replicas
    LatencySample     gateway -> jobmgr autoscaler
    UsageCounts       gateway, jobmgr batch runner -> usage readers (CLI, API)
    UsageIndexEntry   the same, naming which (tenant, model) counters exist
    AdmitRequest, AdmitVerdict, FinishRequest   gateway <-> the rate limiter's Lua scripts
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from enum import IntEnum
from typing import Any, Literal, get_args

Raw = bytes | str
KVTier = Literal["device", "host"]
KVEventKind = Literal["stored", "removed"]
_TIERS: tuple[str, ...] = get_args(KVTier)
_KINDS: tuple[str, ...] = get_args(KVEventKind)


class BadMessage(ValueError):
    """A Redis value that does not decode as the message it should be."""


def _text(raw: Raw) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _json(raw: Raw, what: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, TypeError) as exc:
        raise BadMessage(f"{what}: not JSON ({exc})") from None


def _int(value: Any, what: str) -> int:
    try:
        return int(value)
    except (ValueError, TypeError):
        raise BadMessage(f"{what}: {value!r} is not an integer") from None


def _float(value: Any, what: str) -> float:
    try:
        return float(value)
    except (ValueError, TypeError):
        raise BadMessage(f"{what}: {value!r} is not a number") from None


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise BadMessage(f"{what}: {value!r} is not a list of strings")
    return tuple(value)


# --- instance load ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadReport:
    """An instance's load as its pod publishes it every load-report interval (JSON)."""

    # Unix time of the report; requests routed after it are counted against this value.
    at: float = 0.0
    model: str = ""
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    prefix_cache_hit_rate: float = 0.0
    tokens_per_s: float = 0.0
    # Ids of the explicit cached contexts the instance holds pinned (routing prefers it for
    # requests that name one).
    pinned_contexts: tuple[str, ...] = ()
    # Ids of the LoRA adapters the instance holds (device slots and host DRAM): routing sends
    # an adapter's requests where it is already loaded.
    adapters: tuple[str, ...] = ()

    @property
    def kv_use(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    def encode(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def decode(cls, raw: Raw) -> LoadReport:
        data = _json(raw, "load report")
        if not isinstance(data, dict):
            raise BadMessage(f"load report: expected an object, got {type(data).__name__}")
        return cls(
            at=_float(data.get("at", 0.0), "load report at"),
            model=str(data.get("model", "")),
            running=_int(data.get("running", 0), "load report running"),
            waiting=_int(data.get("waiting", 0), "load report waiting"),
            kv_blocks_used=_int(data.get("kv_blocks_used", 0), "load report kv_blocks_used"),
            kv_blocks_total=_int(data.get("kv_blocks_total", 0), "load report kv_blocks_total"),
            prefix_cache_hit_rate=_float(
                data.get("prefix_cache_hit_rate", 0.0), "load report prefix_cache_hit_rate"
            ),
            tokens_per_s=_float(data.get("tokens_per_s", 0.0), "load report tokens_per_s"),
            pinned_contexts=_strings(
                data.get("pinned_contexts", ()), "load report pinned_contexts"
            ),
            adapters=_strings(data.get("adapters", ()), "load report adapters"),
        )


# --- KV events ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KVEventEntry:
    """One entry of an instance's KV-event stream: block hashes (hex) a tier of its KV cache
    now holds (`stored`) or has dropped (`removed`). Stored as one stream field, `e`, of JSON."""

    FIELD = "e"

    kind: KVEventKind
    tier: KVTier
    hashes: tuple[str, ...]
    # Unix time the engine emitted it (0: unknown).
    at: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise BadMessage(f"KV event: unknown kind {self.kind!r}")
        if self.tier not in _TIERS:
            raise BadMessage(f"KV event: unknown tier {self.tier!r}")

    def encode(self) -> dict[str, str]:
        body = {"kind": self.kind, "tier": self.tier, "hashes": list(self.hashes), "at": self.at}
        return {self.FIELD: json.dumps(body, separators=(",", ":"))}

    @classmethod
    def decode(cls, entry: Mapping[Any, Raw]) -> KVEventEntry:
        raw = entry.get(cls.FIELD.encode(), entry.get(cls.FIELD))
        if raw is None:
            raise BadMessage(f"KV event: no {cls.FIELD!r} field")
        data = _json(raw, "KV event")
        if not isinstance(data, dict):
            raise BadMessage(f"KV event: expected an object, got {type(data).__name__}")
        hashes = data.get("hashes")
        if not isinstance(hashes, list) or not all(isinstance(h, str) for h in hashes):
            raise BadMessage("KV event: hashes must be a list of hex strings")
        return cls(
            kind=data.get("kind"),  # type: ignore[arg-type]  # checked in __post_init__
            tier=data.get("tier"),  # type: ignore[arg-type]
            hashes=tuple(hashes),
            at=_float(data.get("at", 0.0), "KV event at"),
        )


# --- routing state shared by scheduler replicas -------------------------------------------


@dataclass(frozen=True, slots=True)
class RoutedSince:
    """Requests the scheduler replicas routed to an instance since its report of `report_at`:
    one field of the instance's routed hash (`repr(report_at)` -> count, added with HINCRBY)."""

    report_at: float
    count: int = 0

    @property
    def field(self) -> str:
        return self.field_for(self.report_at)

    @staticmethod
    def field_for(report_at: float) -> str:
        # repr round-trips a float exactly: every replica names the same report the same way.
        return repr(float(report_at))

    @classmethod
    def decode(cls, report_at: float, raw: Raw | None) -> RoutedSince:
        return cls(report_at, _int(raw, "routed count") if raw is not None else 0)


@dataclass(frozen=True, slots=True)
class SuspectInstance:
    """An instance a caller saw fail (its stream or connection broke), as JSON: routing avoids
    it until its load reports show it alive after `since`, or its record leaves etcd."""

    # Unix time the failure was reported.
    since: float
    reason: str = ""
    # The scheduler replica that was told.
    reporter: str = ""

    def encode(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def decode(cls, raw: Raw) -> SuspectInstance:
        data = _json(raw, "suspect instance")
        if not isinstance(data, dict):
            raise BadMessage(f"suspect instance: expected an object, got {type(data).__name__}")
        return cls(
            since=_float(data.get("since"), "suspect instance since"),
            reason=str(data.get("reason", "")),
            reporter=str(data.get("reporter", "")),
        )


@dataclass(frozen=True, slots=True)
class DecodeHistory:
    """Finished requests per decode-length bucket (upper edge, tokens) of one model and tenant:
    a hash of bucket -> count, added to with HINCRBY."""

    buckets: dict[int, int] = field(default_factory=dict)

    def encode(self) -> dict[str, int]:
        return {str(bucket): count for bucket, count in self.buckets.items()}

    @classmethod
    def decode(cls, reply: Mapping[Raw, Raw]) -> DecodeHistory:
        return cls(
            {_int(_text(k), "history bucket"): _int(v, "history count") for k, v in reply.items()}
        )


# --- latency ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LatencySample:
    """One finished request as the client saw it: a JSON array [at, ttft_s, tpot_s]."""

    at: float
    ttft_s: float
    # 0 when the request produced at most one token.
    tpot_s: float

    def encode(self) -> str:
        return json.dumps([round(self.at, 3), round(self.ttft_s, 4), round(self.tpot_s, 5)])

    @classmethod
    def decode(cls, raw: Raw) -> LatencySample:
        data = _json(raw, "latency sample")
        if not isinstance(data, list) or len(data) != 3:
            raise BadMessage("latency sample: expected [at, ttft_s, tpot_s]")
        at, ttft, tpot = (_float(v, "latency sample") for v in data)
        return cls(at, ttft, tpot)


# --- usage --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UsageCounts:
    """Token usage of one tenant on one model: a hash of counters, added to with HINCRBY."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def encode(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def decode(cls, reply: Mapping[Raw, Raw]) -> UsageCounts:
        values = {_text(k): v for k, v in reply.items()}
        return cls(**{f.name: _int(values.get(f.name, 0), f"usage {f.name}") for f in fields(cls)})


@dataclass(frozen=True, slots=True)
class UsageIndexEntry:
    """A (tenant, model) pair that has usage counters: one member of the usage index set."""

    SEPARATOR = "\x1f"

    tenant: str
    model: str

    def encode(self) -> str:
        return f"{self.tenant}{self.SEPARATOR}{self.model}"

    @classmethod
    def decode(cls, raw: Raw) -> UsageIndexEntry:
        tenant, sep, model = _text(raw).partition(cls.SEPARATOR)
        if not sep:
            raise BadMessage(f"usage index entry {raw!r} has no separator")
        return cls(tenant, model)


# --- rate limits --------------------------------------------------------------------------


class LimitRefusal(IntEnum):
    """Which limit refused an admission (0: none did)."""

    NONE = 0
    REQUESTS_PER_MIN = 1
    TOKENS_PER_MIN = 2
    CONCURRENCY = 3
    # The request alone needs more tokens than the tenant may use per window.
    LARGER_THAN_TOKENS_PER_MIN = 4


@dataclass(frozen=True, slots=True)
class AdmitRequest:
    """The admission script's ARGV: one request against a tenant's limits (0: no limit)."""

    entry_id: str
    requests_per_min: int
    tokens_per_min: int
    max_concurrent: int
    estimated_tokens: int
    window_ms: int
    slot_ttl_ms: int

    def encode(self) -> list[str | int]:
        return [
            self.entry_id,
            self.requests_per_min,
            self.tokens_per_min,
            self.max_concurrent,
            self.estimated_tokens,
            self.window_ms,
            self.slot_ttl_ms,
        ]


@dataclass(frozen=True, slots=True)
class AdmitVerdict:
    """The admission script's reply {refusal, milliseconds until that limit has room}."""

    refusal: LimitRefusal
    wait_ms: int = 0

    @property
    def admitted(self) -> bool:
        return self.refusal == LimitRefusal.NONE

    @classmethod
    def decode(cls, reply: Any) -> AdmitVerdict:
        if not isinstance(reply, list | tuple) or len(reply) != 2:
            raise BadMessage(f"admission reply {reply!r} is not {{refusal, wait_ms}}")
        code = _int(reply[0], "admission refusal")
        try:
            refusal = LimitRefusal(code)
        except ValueError:
            raise BadMessage(f"admission reply: unknown refusal {code}") from None
        return cls(refusal, _int(reply[1], "admission wait_ms"))


@dataclass(frozen=True, slots=True)
class FinishRequest:
    """The finish script's ARGV: release an admission's slot, charge its actual tokens."""

    entry_id: str
    actual_tokens: int

    def encode(self) -> list[str | int]:
        return [self.entry_id, self.actual_tokens]
