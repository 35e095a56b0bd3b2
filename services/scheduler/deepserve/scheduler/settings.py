"""The scheduler service's settings, read from `DEEPSERVE_SCHEDULER_*` environment variables."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from deepserve.config import ServiceSettings


class SchedulerSettings(ServiceSettings):
    """The scheduler: its default policy, balance thresholds and refresh intervals."""

    model_config = SettingsConfigDict(env_prefix="DEEPSERVE_SCHEDULER_", extra="ignore")

    grpc_port: int = 50052
    # Policy for models whose deployment names none: deepserve (Algorithm 1), round_robin,
    # random or least_loaded.
    default_policy: str = "deepserve"
    # A group is imbalanced when max - min load exceeds the absolute threshold AND max exceeds
    # min times the relative one; then load wins over cache locality.
    balance_abs_threshold: float = 4.0
    balance_rel_threshold: float = 1.5
    # Load units a full KV cache adds to an instance's queued + running requests.
    kv_load_weight: float = 4.0
    # Seconds between reads of the instances' load reports from Redis (and of suspect marks).
    load_refresh_s: float = 0.1
    # An instance reported failing is avoided until its load reports continue this long after
    # the report (a live instance reports every half second; a dead one never again).
    suspect_clear_after_s: float = 1.0
    # Decode-length buckets (the paper used 128-token buckets) and the guess with no history.
    decode_bucket_tokens: int = 128
    default_decode_tokens: int = 256
    # Seconds between refreshes of the shared per-(model, tenant) output-length histories.
    history_refresh_s: float = 1.0
    # Longest block of one read of the instances' KV-event streams.
    kv_events_block_ms: int = 100
