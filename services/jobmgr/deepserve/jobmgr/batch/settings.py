"""Settings of the batch runner (read once in jobmgr's main, passed in)."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class BatchSettings(BaseSettings):
    """How batches run: their priority, how many lines each sends at once, and limits."""

    model_config = SettingsConfigDict(env_prefix="DEEPSERVE_JOBMGR_BATCH_", extra="ignore")

    # Engines admit waiting requests by priority: interactive traffic has 0, so a batch line
    # never takes a slot an interactive request is waiting for.
    priority: int = -10
    # Lines of one batch in flight at once.
    concurrency: int = 8
    # Scheduler to route through; empty: the first one registered in etcd.
    scheduler_address: str = ""
    route_timeout_s: float = 10.0
    # One line's time limit (routing plus generation).
    request_timeout_s: float = 600.0
    # Tries of a line that failed with a retryable error (no instance, engine busy).
    attempts: int = 3
    retry_delay_s: float = 1.0
    # Migrations per line when its instance dies mid-generation (see the gateway's setting).
    max_migrations: int = 2
    # Finished lines are saved (and counted in the job) at least this often.
    flush_interval_s: float = 0.5
