"""Client channels with keepalive and a retry policy for transient failures."""

from __future__ import annotations

import json

import grpc

from deepserve.telemetry import grpc_client_interceptors

# Retries only UNAVAILABLE (the server was not reached or went away before answering): safe
# for every RPC here because the request was not processed.
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)

CHANNEL_OPTIONS: list[tuple[str, object]] = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 1),
    ("grpc.service_config", _SERVICE_CONFIG),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
]


# Servers accept pings as often as every second and never answer them with GOAWAY: the
# default (one ping per 5 min, GOAWAY "too_many_pings" on the third) killed Generate streams
# silent through a long prefill, and the gateway's engine channels ping every 2 s.
SERVER_OPTIONS: list[tuple[str, object]] = [
    *CHANNEL_OPTIONS,
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 1_000),
    ("grpc.http2.max_ping_strikes", 0),
]


def insecure_channel(
    address: str, *, traced: bool = True, keepalive_s: float | None = None
) -> grpc.aio.Channel:
    """A grpc.aio channel to `address` (host:port); trace context travels in its metadata.

    `keepalive_s` pings the peer that often and gives up on the connection when a ping goes
    unanswered as long: calls over a cut link then fail within about twice that, instead of
    hanging until a deadline (a silent link never resets a TCP connection by itself)."""
    interceptors = grpc_client_interceptors() if traced else None
    options = CHANNEL_OPTIONS
    if keepalive_s is not None:
        ms = max(int(keepalive_s * 1000), 1000)
        options = [
            *(o for o in CHANNEL_OPTIONS if not o[0].startswith("grpc.keepalive_")),
            ("grpc.keepalive_time_ms", ms),
            ("grpc.keepalive_timeout_ms", ms),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
