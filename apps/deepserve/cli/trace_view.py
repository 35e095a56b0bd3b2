"""`deepserve trace ID`: one trace's span tree from the local JSON-lines span files.

ID is a trace id (32 hex digits) or a request id: the trace of the span whose `request_id`
attribute equals it. Each line shows the span's duration, offset from the trace start and the
process (service and pid) that recorded it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from deepserve.errors import NotFound

Span = dict[str, Any]


def read_spans(telemetry_dir: Path) -> Iterable[Span]:
    for path in sorted(telemetry_dir.glob("*.jsonl")):
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                line = line.strip()
                if line:
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by a killed process


def find_trace(spans: Iterable[Span], wanted: str) -> list[Span]:
    wanted = wanted.strip().lower()
    by_trace: dict[str, list[Span]] = defaultdict(list)
    trace_of_request: str | None = None
    for span in spans:
        by_trace[span["trace_id"]].append(span)
        if span.get("attributes", {}).get("request_id") == wanted:
            trace_of_request = span["trace_id"]
    trace_id = wanted if wanted in by_trace else trace_of_request
    if trace_id is None:
        raise NotFound(f"no trace or request {wanted!r} in the span files", field="id")
    return by_trace[trace_id]


def render_tree(spans: list[Span]) -> list[str]:
    ids = {s["span_id"] for s in spans}
    children: dict[str | None, list[Span]] = defaultdict(list)
    for span in spans:
        parent = span.get("parent_span_id")
        children[parent if parent in ids else None].append(span)
    for group in children.values():
        group.sort(key=lambda s: s["start_unix_ns"])
    start = min(s["start_unix_ns"] for s in spans)
    lines = [f"trace {spans[0]['trace_id']}  ({len(spans)} spans)"]

    def walk(span: Span, depth: int) -> None:
        duration_ms = (span["end_unix_ns"] - span["start_unix_ns"]) / 1e6
        offset_ms = (span["start_unix_ns"] - start) / 1e6
        where = f"{span.get('service') or '?'}[{span.get('pid') or '?'}]"
        status = "" if span.get("status") in ("UNSET", "OK") else f"  {span['status']}"
        lines.append(
            f"{'  ' * depth}{span['name']:<{max(1, 48 - 2 * depth)}} "
            f"{duration_ms:9.2f} ms  +{offset_ms:8.2f} ms  {where}{status}"
        )
        for child in children.get(span["span_id"], []):
            walk(child, depth + 1)

    for root in children[None]:
        walk(root, 0)
    return lines


def print_trace(telemetry_dir: Path, wanted: str) -> int:
    for line in render_tree(find_trace(read_spans(telemetry_dir), wanted)):
        print(line)
    return 0
