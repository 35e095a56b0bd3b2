"""The jobmgr service's settings, read from `DEEPSERVE_JOBMGR_*` environment variables."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from deepserve.config import ServiceSettings


class JobMgrSettings(ServiceSettings):
    """jobmgr: its election, reconcile, retry and autoscaling timings."""

    model_config = SettingsConfigDict(env_prefix="DEEPSERVE_JOBMGR_", extra="ignore")

    grpc_port: int = 50051
    podpool_address: str = "127.0.0.1:50053"
    # Seconds a dead leader keeps leading; another replica takes over within it.
    election_ttl_s: int = 5
    # Full reconcile pass at least this often, even when no watch event woke the loop.
    resync_interval_s: float = 5.0
    # How long one AcquirePod (claim or cold start, plus model load) may take.
    acquire_timeout_s: float = 300.0
    # First retry delay for a task whose start failed; doubles per failure up to the cap.
    retry_backoff_s: float = 1.0
    retry_backoff_max_s: float = 30.0
    # Seconds between autoscaler passes (held demand wakes it at once).
    autoscale_interval_s: float = 1.0
    # A gateway's demand record counts for this long after its last refresh.
    demand_ttl_s: float = 30.0
    # Recent requests whose latencies count against a deployment's SLOs.
    slo_window_s: float = 30.0
