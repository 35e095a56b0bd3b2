"""The gateway service's settings, read from `DEEPSERVE_GATEWAY_*` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import SettingsConfigDict

from deepserve.config import ServiceSettings


class GatewaySettings(ServiceSettings):
    """The gateway: its HTTP and gRPC ports, auth mode, limits and timeouts."""

    model_config = SettingsConfigDict(env_prefix="DEEPSERVE_GATEWAY_", extra="ignore")

    grpc_port: int = 50050
    http_port: int = 8000
    scheduler_address: str = "127.0.0.1:50052"
    # jobmgr's API, the one writer of jobs (fine-tuning, batch); empty: a live jobmgr from the
    # service registry in etcd.
    jobmgr_address: str = ""
    # Seconds a call to jobmgr may take before the request fails with 503.
    jobmgr_timeout_s: float = 10.0
    # Open mode accepts calls without an API key, or with a wrong one, charging them to
    # `open_tenant`: anyone who can reach the gateway may use it. Meant for the local demo only,
    # so an open gateway refuses to listen on anything but a loopback address unless
    # `auth_open_allow_remote` says so explicitly.
    auth_open: bool = False
    auth_open_allow_remote: bool = False
    # The tenant that keyless (or unknown-key) calls are charged to in open mode.
    open_tenant: str = "anonymous"
    request_timeout_s: float = 600.0
    # Seconds a Route call to the scheduler may take before the request fails with 503.
    route_timeout_s: float = 5.0
    # Re-routes (to another instance) when an engine fails before its first token.
    generate_retries: int = 1
    # Migrations per engine request (each choice): when its instance dies mid-stream, the
    # request continues on another instance from the tokens already streamed, at most this
    # many times; then the stream ends with an error event. 0 disables migration.
    max_migrations: int = 2
    # Limits of tenants without a record of their own (0: unlimited).
    default_requests_per_min: int = 0
    default_tokens_per_min: int = 0
    default_max_concurrent: int = 0
    rate_limit_window_s: float = 60.0
    # Completion tokens charged up front against tokens/min when a request sets no max_tokens.
    max_tokens_estimate: int = 256
    # Upper bound of engine requests one API call may fan out to (n times the prompts).
    max_fanout: int = 128
    # Where tokenizers of catalog models are found (the model cache); None: the default cache.
    model_cache_dir: Path | None = None
    # Scale from zero: how long a request for an autoscaled model with no live instance waits
    # for the first one before a 503 with Retry-After (0 disables holding).
    scale_from_zero_timeout_s: float = 60.0
    # Tool calling: the parser of every model's tool calls (hermes, llama3_json, mistral), or
    # per model ({"model": "parser"}); unset, each model's is detected from its chat template.
    tool_parser: str = ""
    tool_parsers: dict[str, str] = {}
    # Responses API: how long stored responses (conversation state) live in etcd.
    response_retention_s: float = 30 * 24 * 3600.0
    # Explicit context caching: default and longest TTL, size, and contexts per tenant (a
    # tenant's own limit, when set, overrides the last).
    cached_context_default_ttl_s: int = 3600
    cached_context_max_ttl_s: int = 7 * 24 * 3600
    cached_context_max_tokens: int = 32768
    max_cached_contexts_per_tenant: int = 16
