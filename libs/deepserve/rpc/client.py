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


def insecure_channel(address: str, *, traced: bool = True) -> grpc.aio.Channel:
    """A grpc.aio channel to `address` (host:port); trace context travels in its metadata."""
    interceptors = grpc_client_interceptors() if traced else None
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=interceptors)
