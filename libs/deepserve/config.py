"""The settings every process shares, read from `DEEPSERVE_*` environment variables.

One settings object per service, built once in its entry point and passed in; nothing deep in the
code reads the environment. Shared connection settings sit in `CommonSettings`
(`DEEPSERVE_ETCD_ENDPOINT`, ...); each service's own settings class lives in that service
(`deepserve.<service>.settings`) and its fields carry its name (`DEEPSERVE_GATEWAY_HTTP_PORT`,
`DEEPSERVE_FLOWSERVE_MODEL`, ...).
"""

from __future__ import annotations

import socket
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_run_dir() -> Path:
    return Path.home() / ".deepserve" / "run"


class CommonSettings(BaseSettings):
    """Connections and cross-cutting options every service shares."""

    model_config = SettingsConfigDict(env_prefix="DEEPSERVE_", extra="ignore")

    etcd_endpoint: str = "127.0.0.1:2379"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Pool size per process; callers beyond it wait for a connection instead of failing.
    redis_max_connections: int = 64
    # Seconds one Redis command may take before it counts as failed (hot state: callers degrade).
    redis_socket_timeout_s: float = 30.0
    # Seconds a registration (pod, instance, service) outlives its process's last keep-alive.
    lease_ttl_s: int = 5
    # Where this host's processes listen and advertise themselves.
    host: str = "127.0.0.1"
    # The name this host goes by on pod records (which pods share a host's DRAM copies and
    # pidfd watch). Defaults to the hostname; hosts that share one (network namespaces on one
    # machine) set their own.
    host_name: str = Field(default_factory=socket.gethostname)
    otlp_endpoint: str | None = None
    # Local span export (JSON lines) when no OTLP endpoint is set; None disables it.
    telemetry_dir: Path | None = None
    log_level: str = "INFO"
    log_dir: Path | None = None
    # Uploaded files and training artifacts (content-addressed); None: ~/.deepserve/files.
    files_root: Path | None = None
    # Largest file one upload may carry.
    files_max_bytes: int = 512 * 1024 * 1024
    # The one LoRA rank limit: adapters above it are refused at registration, and the engines'
    # adapter slots are this wide.
    lora_max_rank: int = 16


class ServiceSettings(BaseSettings):
    """Base of each service's settings: its gRPC port plus the common block."""

    model_config = SettingsConfigDict(extra="ignore")

    common: CommonSettings = Field(default_factory=CommonSettings)
    grpc_port: int = 0
    # Prometheus /metrics port; 0 picks a free one (advertised in the service's etcd record).
    metrics_port: int = 0
    # Seconds in-flight RPCs get to finish after SIGTERM.
    shutdown_grace_s: float = 5.0
