"""A streaming OpenAI-API client for serving benchmarks: per-request TTFT and TPOT over SSE.

Neither server's own client: it speaks plain HTTP/1.1 + SSE (httpx) to `/v1/completions` and
`/v1/chat/completions`, so DeepServe's gateway and vLLM's server are measured the same way.
Requests ask for `ignore_eos` so each makes exactly `max_tokens` tokens; TPOT is
(last token - first token) / (max_tokens - 1), as `vllm bench serve` defines it.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.common import percentile


@dataclass(slots=True)
class RequestTiming:
    """One streamed request: when it was sent, its first and last token, tokens asked."""

    sent: float
    first: float
    last: float
    tokens: int


@dataclass(slots=True)
class WorkloadResult:
    """One workload on one server: throughput and the latency distributions."""

    workload: str
    output_tokens: int
    wall_s: float
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    def summary(self) -> dict[str, float]:
        return {
            "output_tok_s": self.tokens_per_s,
            "ttft_p50_ms": percentile(self.ttft_s, 50) * 1e3,
            "tpot_p50_ms": percentile(self.tpot_s, 50) * 1e3,
            "wall_s": self.wall_s,
            "output_tokens": self.output_tokens,
        }


@dataclass(frozen=True, slots=True)
class Call:
    """One request of a workload: its path, body (stream and ignore_eos are added) and tokens."""

    path: str
    body: dict[str, Any]
    max_tokens: int


class StreamingClient:
    """Sends Calls to one server, at most `concurrency` at a time (None: all at once)."""

    def __init__(self, base_url: str, model: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model

    async def run(self, name: str, calls: list[Call], concurrency: int | None) -> WorkloadResult:
        limits = httpx.Limits(max_connections=len(calls), max_keepalive_connections=len(calls))
        gate = asyncio.Semaphore(concurrency or len(calls))
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(None)) as http:

            async def one(call: Call) -> RequestTiming:
                async with gate:
                    return await self._stream(http, call)

            start = time.perf_counter()
            timings = await asyncio.gather(*(one(c) for c in calls))
        wall = max(t.last for t in timings) - start
        return WorkloadResult(
            workload=name,
            output_tokens=sum(t.tokens for t in timings),
            wall_s=wall,
            ttft_s=[t.first - t.sent for t in timings],
            tpot_s=[(t.last - t.first) / (t.tokens - 1) for t in timings if t.tokens > 1],
        )

    async def _stream(self, http: httpx.AsyncClient, call: Call) -> RequestTiming:
        body = {
            **call.body,
            "model": self.model,
            "max_tokens": call.max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
        }
        sent = time.perf_counter()
        first = last = 0.0
        async with http.stream("POST", self.base_url + call.path, json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")[:500]
                raise RuntimeError(f"{call.path}: HTTP {response.status_code}: {detail}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"{call.path}: {chunk['error']}")
                if not chunk.get("choices"):
                    continue
                now = time.perf_counter()
                if not first:
                    first = now
                last = now
        if not first:
            raise RuntimeError(f"{call.path}: the stream carried no tokens")
        return RequestTiming(sent=sent, first=first, last=last, tokens=call.max_tokens)


def completion_call(prompt_ids: list[int], max_tokens: int) -> Call:
    return Call("/v1/completions", {"prompt": prompt_ids}, max_tokens)


def chat_call(messages: list[dict[str, str]], max_tokens: int) -> Call:
    return Call("/v1/chat/completions", {"messages": messages}, max_tokens)
