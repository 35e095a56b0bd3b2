"""Spans for a request's life inside the engine, built from its timeline when it finishes.

The engine loop runs on its own thread and must not pay for tracing per step; it only stamps
times on the request (`RequestTimeline`). When the request ends, the service turns the stamps
into child spans of the Generate call's span: queue wait, one span per prompt chunk, and one
decode span with the token count and a timing event per streamed output.
"""

from __future__ import annotations

from opentelemetry import trace

from deepserve.flowserve.engine.request import RequestTimeline

_tracer = trace.get_tracer(__name__)


def record_engine_spans(
    timeline: RequestTimeline,
    *,
    request_id: str,
    prompt_tokens: int,
    cached_tokens: int,
    output_tokens: int,
    token_times_ns: list[int],
) -> None:
    """Emits the spans under the current span (the Generate server span)."""
    end_ns = timeline.finished_ns or timeline.first_token_ns or timeline.arrived_ns
    if timeline.adapter_load is not None:
        # The adapter's first request read it from storage: that wait is this request's.
        load_start, load_end = timeline.adapter_load
        load = _tracer.start_span("engine.adapter_load", start_time=load_start)
        load.set_attribute("request_id", request_id)
        load.end(end_time=load_end)
    queue_end = timeline.first_scheduled_ns or end_ns
    span = _tracer.start_span("engine.queue", start_time=timeline.arrived_ns)
    span.set_attribute("request_id", request_id)
    span.end(end_time=max(queue_end, timeline.arrived_ns))
    for index, (start, end, tokens) in enumerate(timeline.prefill_chunks):
        chunk = _tracer.start_span("engine.prefill", start_time=start)
        chunk.set_attribute("chunk", index)
        chunk.set_attribute("tokens", tokens)
        chunk.set_attribute("prompt_tokens", prompt_tokens)
        chunk.set_attribute("cached_tokens", cached_tokens)
        chunk.end(end_time=end)
    if timeline.first_token_ns is not None:
        decode = _tracer.start_span("engine.decode", start_time=timeline.first_token_ns)
        decode.set_attribute("output_tokens", output_tokens)
        seconds = (end_ns - timeline.first_token_ns) / 1e9
        if output_tokens > 1 and seconds > 0:
            decode.set_attribute("tpot_ms", 1000 * seconds / (output_tokens - 1))
        for count, at_ns in enumerate(token_times_ns, start=1):
            decode.add_event("tokens", {"count": count}, timestamp=at_ns)
        decode.end(end_time=max(end_ns, timeline.first_token_ns))
