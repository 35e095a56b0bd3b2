"""Tracing, metrics and structured logs for every process.

Spans go to OTLP when `DEEPSERVE_OTLP_ENDPOINT` is set, else to a JSON-lines file per process in
`DEEPSERVE_TELEMETRY_DIR` (the local cluster's run directory), which `deepserve trace` reads.
gRPC servers and clients are instrumented so W3C trace context travels in metadata. Log records
are JSON with the active trace and span ids.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

from deepserve.config import CommonSettings

_configured_service: str | None = None


class JsonLinesSpanExporter(SpanExporter):
    """Appends finished spans as JSON lines to one file per process."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._file = path.open("a", encoding="utf-8")

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [json.dumps(span_to_dict(span)) for span in spans]
        with self._lock:
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()


def span_to_dict(span: ReadableSpan) -> dict[str, Any]:
    ctx = span.get_span_context()
    assert ctx is not None
    return {
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_span_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "name": span.name,
        "kind": span.kind.name,
        "start_unix_ns": span.start_time,
        "end_unix_ns": span.end_time,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "events": [
            {
                "name": e.name,
                "at_unix_ns": e.timestamp,
                "attributes": dict(e.attributes or {}),
            }
            for e in span.events
        ],
        "service": span.resource.attributes.get("service.name"),
        "pid": span.resource.attributes.get("process.pid"),
    }


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, carrying the active trace context."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            payload["trace_id"] = f"{ctx.trace_id:032x}"
            payload["span_id"] = f"{ctx.span_id:016x}"
        for key, value in getattr(record, "fields", {}).items():
            payload[key] = value
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc and aetcd are chatty at INFO about reconnects that we log ourselves.
    logging.getLogger("aetcd").setLevel(logging.WARNING)


def setup_telemetry(service: str, settings: CommonSettings) -> TracerProvider:
    """Installs tracer and meter providers and JSON logging for this process (idempotent)."""
    global _configured_service
    configure_logging(service, settings.log_level)
    current = trace.get_tracer_provider()
    if _configured_service is not None and isinstance(current, TracerProvider):
        return current
    resource = Resource.create({"service.name": f"deepserve-{service}", "process.pid": os.getpid()})
    provider = TracerProvider(resource=resource)
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter,
        )

        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint, insecure=True))
        )
    elif settings.telemetry_dir is not None:
        path = settings.telemetry_dir / f"{service}-{os.getpid()}.jsonl"
        provider.add_span_processor(
            BatchSpanProcessor(JsonLinesSpanExporter(path), schedule_delay_millis=500)
        )
    trace.set_tracer_provider(provider)
    metrics.set_meter_provider(MeterProvider(resource=resource))
    _configured_service = service
    return provider


def shutdown_telemetry() -> None:
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()


def grpc_server_interceptors() -> list[Any]:
    from deepserve.rpc.tracing import TracingServerInterceptor

    return [TracingServerInterceptor()]


def grpc_client_interceptors() -> list[Any]:
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors())
