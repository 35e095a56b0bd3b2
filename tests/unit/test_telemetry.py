"""Span export to JSON lines and JSON logs carrying the active trace id."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from deepserve.telemetry import JsonLinesSpanExporter, JsonLogFormatter


def test_spans_are_written_as_json_lines_with_parent_links(tmp_path: Path) -> None:
    path = tmp_path / "spans" / "svc.jsonl"
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(path)))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("parent"), tracer.start_as_current_span("child") as child:
        child.set_attribute("tokens", 3)
    provider.shutdown()
    spans = {s["name"]: s for s in map(json.loads, path.read_text().splitlines())}
    assert spans["child"]["parent_span_id"] == spans["parent"]["span_id"]
    assert spans["child"]["trace_id"] == spans["parent"]["trace_id"]
    assert spans["child"]["attributes"] == {"tokens": 3}
    assert spans["parent"]["end_unix_ns"] >= spans["child"]["end_unix_ns"]


def test_log_lines_are_json_with_trace_and_span_ids() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLogFormatter("svc"))
    logger = logging.getLogger("deepserve.test.telemetry")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    provider = TracerProvider()
    with provider.get_tracer("t").start_as_current_span("op") as span:
        logger.info("hello %s", "world", extra={"fields": {"request_id": "r1"}})
        ctx = span.get_span_context()
    logger.info("outside")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["msg"] == "hello world" and first["service"] == "svc"
    assert first["request_id"] == "r1"
    assert first["trace_id"] == f"{ctx.trace_id:032x}" and first["span_id"] == f"{ctx.span_id:016x}"
    assert "trace_id" not in second
