"""The gateway in one run: latency it adds to the first token, and requests/s of one process.

Processes: etcd, valkey-server, the scheduler, one gateway (`python -m deepserve.gateway`, open
auth, Redis rate-limit accounting on), and an engine stand-in (this file with `--standin`): a
FlowServeService that answers every Generate at once with `--tokens` messages, registered in
etcd as an instance of smollm2-135m so the gateway tokenizes with the real tokenizer and chat
template. The benchmark client is this process.

Part 1, added latency: the same chat request, sequentially and interleaved, (a) through the
gateway (HTTP, SSE; auth, limits, chat template, tokenization, Route, Generate) and (b) as a
direct gRPC Generate to the stand-in with the already-tokenized prompt. Time to first token is
measured to the first content chunk (a) or the first message (b); the added latency is the
difference of the two distributions' p50 and p99.

Part 2, throughput: non-streamed chat requests (max_tokens 1) from `--concurrency` keep-alive
connections for `--seconds`; requests/s completed by the one gateway process.

    .venv/bin/python -m bench.gateway            # the full run
    .venv/bin/python -m bench.gateway --quick    # a smaller one
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench.common import markdown_table, percentile, progress
from deepserve import records
from deepserve.cluster.state_stores import start_etcd, start_redis_server
from deepserve.models.catalog import DEFAULT_MODEL, default_cache_dir, resolve_model
from deepserve.processes import ManagedProcess, free_port, wait_for_port
from deepserve.records import InstanceRecord, Role
from deepserve.rpc.health_check import wait_serving
from deepserve.store.etcd import EtcdStore
from deepserve.tokenizer import Tokenizer
from deepserve.v1 import common_pb2, flowserve_pb2, flowserve_pb2_grpc

HOST = "127.0.0.1"
MESSAGES = [
    {"role": "system", "content": "You are a concise assistant that answers in one sentence."},
    {
        "role": "user",
        "content": "Explain in plain words why the sky looks blue on a clear day, and why "
        "sunsets are red, for a curious ten-year-old who likes science experiments.",
    },
]


# --- the engine stand-in -----------------------------------------------------------------


class InstantEngine(flowserve_pb2_grpc.FlowServeServiceServicer):
    """Answers every Generate at once: `tokens` messages, the last one finished."""

    def __init__(self, tokens: int) -> None:
        self._tokens = tokens

    async def Generate(
        self, request: flowserve_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[flowserve_pb2.GenerateResponse]:
        count = min(self._tokens, request.sampling.max_tokens or self._tokens)
        for i in range(count):
            reply = flowserve_pb2.GenerateResponse(
                request_id=request.request_id, token_ids=[1000 + i], text=" word"
            )
            if i == count - 1:
                reply.finish_reason = common_pb2.FINISH_REASON_LENGTH
                reply.usage.prompt_tokens = len(request.prompt_token_ids)
                reply.usage.completion_tokens = count
                reply.usage.total_tokens = len(request.prompt_token_ids) + count
            yield reply


async def serve_standin(port: int, etcd_endpoint: str, tokens: int) -> None:
    server = grpc.aio.server()
    flowserve_pb2_grpc.add_FlowServeServiceServicer_to_server(InstantEngine(tokens), server)
    server.add_insecure_port(f"{HOST}:{port}")
    await server.start()
    async with EtcdStore(etcd_endpoint) as etcd:
        await records.instances(etcd).put(
            "standin",
            InstanceRecord(
                instance_id="standin",
                model=DEFAULT_MODEL,
                role=Role.COLOCATED,
                address=f"{HOST}:{port}",
                pod_id="standin",
                max_model_len=8192,
            ),
        )
    await server.wait_for_termination()


# --- processes ---------------------------------------------------------------------------


@dataclass
class Stack:
    gateway_url: str
    engine_address: str
    etcd_endpoint: str


def _env(etcd: str, redis: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "DEEPSERVE_ETCD_ENDPOINT": etcd,
        "DEEPSERVE_REDIS_URL": redis,
        "DEEPSERVE_LOG_LEVEL": "WARNING",
        **extra,
    }


def _listed(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as resp:
            return any(m["id"] == DEFAULT_MODEL for m in json.load(resp)["data"])
    except OSError:
        return False


@contextmanager
def stack(run_dir: Path, tokens: int) -> Iterator[Stack]:
    etcd_port, peer, redis_port = free_port(), free_port(), free_port()
    procs = [
        start_etcd(run_dir / "etcd", HOST, etcd_port, peer, run_dir / "etcd.log"),
        start_redis_server(run_dir / "redis", HOST, redis_port, run_dir / "redis.log"),
    ]
    etcd, redis = f"{HOST}:{etcd_port}", f"redis://{HOST}:{redis_port}/0"
    try:
        for port in (etcd_port, redis_port):
            if not wait_for_port(HOST, port, 30):
                raise RuntimeError(f"store on port {port} did not start")
        engine_port, scheduler_port, http_port = free_port(), free_port(), free_port()
        procs.append(
            ManagedProcess(
                "standin",
                [
                    *(sys.executable, "-m", "bench.gateway", "--standin", str(engine_port)),
                    *("--etcd", etcd, "--tokens", str(tokens)),
                ],
                run_dir / "standin.log",
                env=_env(etcd, redis),
            ).start()
        )
        procs.append(
            ManagedProcess(
                "scheduler",
                [sys.executable, "-m", "deepserve.scheduler"],
                run_dir / "scheduler.log",
                env=_env(etcd, redis, DEEPSERVE_SCHEDULER_GRPC_PORT=str(scheduler_port)),
            ).start()
        )
        procs.append(
            ManagedProcess(
                "gateway",
                [sys.executable, "-m", "deepserve.gateway"],
                run_dir / "gateway.log",
                env=_env(
                    etcd,
                    redis,
                    DEEPSERVE_GATEWAY_GRPC_PORT=str(free_port()),
                    DEEPSERVE_GATEWAY_HTTP_PORT=str(http_port),
                    DEEPSERVE_GATEWAY_SCHEDULER_ADDRESS=f"{HOST}:{scheduler_port}",
                    DEEPSERVE_GATEWAY_AUTH_OPEN="true",
                    # Limits on (high), so every request pays for the Redis admission script.
                    DEEPSERVE_GATEWAY_DEFAULT_REQUESTS_PER_MIN="100000000",
                ),
            ).start()
        )
        if not asyncio.run(wait_serving(f"{HOST}:{scheduler_port}", 60)):
            raise RuntimeError(f"scheduler did not start:\n{procs[3].tail()}")
        url = f"http://{HOST}:{http_port}"
        deadline = time.monotonic() + 60
        while not _listed(url):
            if time.monotonic() > deadline or not procs[4].alive():
                raise RuntimeError(f"gateway not ready:\n{procs[4].tail()}")
            time.sleep(0.1)
        yield Stack(url, f"{HOST}:{engine_port}", etcd)
    finally:
        for proc in reversed(procs):
            proc.stop()


# --- a lean HTTP/1.1 client (so the client's own cost stays small) -----------------------


class HttpConnection:
    """One keep-alive connection; POSTs JSON and reads a sized or chunked (SSE) response."""

    def __init__(self, url: str) -> None:
        host_port = url.removeprefix("http://")
        self._host, port = host_port.rsplit(":", 1)
        self._port = int(port)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self._host, self._port)

    async def post(self, path: str, body: bytes, first_marker: bytes = b"") -> tuple[int, float]:
        """(status, seconds to the first chunk holding `first_marker`, or to the whole body)."""
        assert self._reader is not None and self._writer is not None
        started = time.perf_counter()
        self._writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self._host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = (await self._reader.readuntil(b"\r\n\r\n")).lower()
        status = int(head.split(b" ", 2)[1])
        if b"transfer-encoding: chunked" not in head:
            length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
            await self._reader.readexactly(length)
            return status, time.perf_counter() - started
        first = 0.0
        while True:
            size = int((await self._reader.readuntil(b"\r\n")).strip(), 16)
            data = await self._reader.readexactly(size + 2)
            if size == 0:
                return status, first
            if not first and first_marker in data:
                first = time.perf_counter() - started

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


# --- measurements ------------------------------------------------------------------------


@dataclass
class LatencyResult:
    gateway_ms: list[float]
    direct_ms: list[float]


async def measure_latency(s: Stack, requests: int, prompt_ids: list[int]) -> LatencyResult:
    body = json.dumps(
        {"model": DEFAULT_MODEL, "messages": MESSAGES, "max_tokens": 16, "stream": True}
    ).encode()
    generate = flowserve_pb2.GenerateRequest(
        model=DEFAULT_MODEL,
        prompt_token_ids=prompt_ids,
        sampling=common_pb2.SamplingParams(max_tokens=16, temperature=1.0, top_p=1.0),
        detokenize=True,
    )
    http = HttpConnection(s.gateway_url)
    await http.open()
    result = LatencyResult([], [])
    async with grpc.aio.insecure_channel(s.engine_address) as channel:
        stub = flowserve_pb2_grpc.FlowServeServiceStub(channel)
        for i in range(requests):
            status, ttft = await http.post(
                "/v1/chat/completions", body, first_marker=b'"delta":{"content"'
            )
            assert status == 200, status
            generate.request_id = f"direct-{i}"
            started = time.perf_counter()
            first = 0.0
            async for _msg in stub.Generate(generate):
                first = first or time.perf_counter() - started
            if i >= requests // 10:  # the first tenth warms both paths up
                result.gateway_ms.append(ttft * 1000)
                result.direct_ms.append(first * 1000)
    await http.close()
    return result


async def measure_throughput(s: Stack, concurrency: int, seconds: float) -> tuple[float, int]:
    body = json.dumps({"model": DEFAULT_MODEL, "messages": MESSAGES, "max_tokens": 1}).encode()
    done = 0
    failed = 0
    stop_at = 0.0

    async def worker() -> None:
        nonlocal done, failed
        conn = HttpConnection(s.gateway_url)
        await conn.open()
        while time.perf_counter() < stop_at:
            status, _ = await conn.post("/v1/chat/completions", body)
            if status == 200:
                done += 1
            else:
                failed += 1
        await conn.close()

    # Warm-up, then the measured window.
    stop_at = time.perf_counter() + 1.0
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    done = failed = 0
    started = time.perf_counter()
    stop_at = started + seconds
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - started), failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--standin", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--etcd", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.standin:
        asyncio.run(serve_standin(args.standin, args.etcd, args.tokens))
        return 0
    if args.quick:
        args.requests, args.seconds = 200, 3.0
    tokenizer = Tokenizer.from_model_dir(resolve_model(DEFAULT_MODEL, default_cache_dir()))
    prompt_ids = tokenizer.encode_chat(MESSAGES)
    with (
        tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp,
        stack(Path(tmp), args.tokens) as s,
    ):
        progress(f"stack up; {args.requests} interleaved requests, prompt {len(prompt_ids)} tokens")
        lat = asyncio.run(measure_latency(s, args.requests, prompt_ids))
        progress(f"throughput: {args.concurrency} connections for {args.seconds:.0f}s")
        rps, failed = asyncio.run(measure_throughput(s, args.concurrency, args.seconds))
    rows = []
    for q in (50, 99):
        gw, direct = percentile(lat.gateway_ms, q), percentile(lat.direct_ms, q)
        rows.append([f"p{q}", gw, direct, gw - direct])
    print(f"\nTime to first token, ms ({len(lat.gateway_ms)} requests each, {os.cpu_count()} CPUs)")
    print(markdown_table(["", "through gateway", "direct Generate", "added"], rows))
    print(f"\nThroughput of one gateway process: {rps:.0f} requests/s "
          f"({args.concurrency} connections, non-streamed chat, {failed} failed)")  # fmt: skip
    print(json.dumps({
        "added_ms_p50": rows[0][3], "added_ms_p99": rows[1][3],
        "gateway_ttft_ms_p50": rows[0][1], "direct_ttft_ms_p50": rows[0][2],
        "requests_per_s": rps,
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
