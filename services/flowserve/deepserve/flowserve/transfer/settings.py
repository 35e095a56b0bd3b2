"""Settings of KV transfer between instances (env DEEPSERVE_FLOWSERVE_KV_*)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict

TransferMode = Literal["whole", "layerwise"]


class TransferSettings(BaseSettings):
    """How a decode instance asks for KV and how a prefill instance sends it."""

    model_config = SettingsConfigDict(env_prefix="DEEPSERVE_FLOWSERVE_KV_", extra="ignore")

    # whole: one transfer after the prefill; layerwise: each layer as soon as it is computed.
    transfer_mode: TransferMode = "whole"
    # Let same-host pairs pass KV through shared memory (the gRPC message carries a handle).
    allow_shared_memory: bool = True
    shared_memory_dir: Path = Path("/dev/shm")
    # Let pairs on different hosts pass KV bytes over a plain TCP connection the prefill side
    # offers (messages carry the metadata): ~10x gRPC chunks across hosts.
    allow_tcp: bool = True
    # Where a prefill instance listens for those connections: its own address (set by the pod;
    # empty: it offers none, and pairs fall back to gRPC bytes).
    tcp_bind_host: str = ""
    # Host memory a decode instance keeps between TCP transfers to land their KV in (reused:
    # fresh pages per transfer cost a fault each); a larger transfer lands in a buffer of its
    # own, dropped after.
    tcp_landing_keep_bytes: int = 512 * 1024 * 1024
    # Largest KV payload in one message (and one shared-memory segment).
    max_chunk_bytes: int = 4 * 1024 * 1024
    # The whole prefill + transfer, seen from the decode side; then the request fails.
    prefill_timeout_s: float = 120.0
    # Longest silence between two messages of a transfer (a hung prefill instance); the prefill
    # side sends heartbeats while a prompt waits in its queue or computes.
    idle_timeout_s: float = 30.0
    heartbeat_interval_s: float = 2.0
    # How long a decode instance waits for free KV blocks before refusing the request.
    reserve_timeout_s: float = 30.0
    # Unclaimed shared-memory segments older than this are removed by their creator.
    segment_ttl_s: float = 300.0
