"""`deepserve trace`: finds a trace by trace id or request id and prints its span tree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepserve.cli.trace_view import find_trace, read_spans, render_tree
from deepserve.errors import NotFound

TRACE = "ab" * 16


def span(name: str, sid: str, parent: str | None, start: int, end: int, service: str, **attrs):  # type: ignore[no-untyped-def]
    return {
        "trace_id": TRACE,
        "span_id": sid,
        "parent_span_id": parent,
        "name": name,
        "start_unix_ns": start,
        "end_unix_ns": end,
        "status": "UNSET",
        "attributes": attrs,
        "service": service,
        "pid": 7,
    }


def write_files(root: Path) -> None:
    root.mkdir()
    (root / "gateway-1.jsonl").write_text(
        json.dumps(
            span("POST /v1/chat/completions", "01", None, 0, 9_000_000, "gw", request_id="req-1")
        )
        + "\n"
        + json.dumps(span("route", "02", "01", 1_000_000, 2_000_000, "gw"))
        + "\n{not json, a line cut short\n"
    )
    (root / "flowserve-2.jsonl").write_text(
        json.dumps(span("generate", "03", "01", 2_000_000, 8_000_000, "fs"))
        + "\n"
        + json.dumps({**span("other", "09", None, 0, 1, "fs"), "trace_id": "cd" * 16})
        + "\n"
    )


def test_request_id_and_trace_id_find_the_same_tree_across_processes(tmp_path: Path) -> None:
    write_files(tmp_path / "t")
    by_request = find_trace(read_spans(tmp_path / "t"), "req-1")
    by_trace = find_trace(read_spans(tmp_path / "t"), TRACE.upper())
    assert (
        {s["span_id"] for s in by_request} == {s["span_id"] for s in by_trace} == {"01", "02", "03"}
    )
    lines = render_tree(by_request)
    assert lines[0].startswith(f"trace {TRACE}")
    assert lines[1].startswith("POST /v1/chat/completions") and "9.00 ms" in lines[1]
    # children are indented under their parent, in start order, with their process
    assert lines[2].startswith("  route") and "gw[7]" in lines[2]
    assert lines[3].startswith("  generate") and "fs[7]" in lines[3]


def test_unknown_id_is_not_found(tmp_path: Path) -> None:
    write_files(tmp_path / "t")
    with pytest.raises(NotFound):
        find_trace(read_spans(tmp_path / "t"), "nope")
