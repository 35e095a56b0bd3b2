"""Scale from zero, traced: the first request for a model at zero replicas, with a warm pod and
a DRAM copy of the model on the host, to its first token; each step from the span files.

Starts `deepserve up` (a few warm pods forked from the zygote, the model pinned in DRAM), then
per rep: a new autoscaled deployment at zero replicas, one streaming request through the
gateway, its TTFT; then the job is deleted. After the reps, every span that began inside the
last request's window (gateway, jobmgr, podpool, pod, scheduler) is listed with its offset
from the request, so each step of the path shows where the time went.

    .venv/bin/python -m bench.from_zero --allow-busy          # 5 reps, smollm2-135m
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import markdown_table, progress
from bench.machine import machine_line, platform_processes
from bench.scaling import cluster, spread, wait_pool
from deepserve.rpc.client import insecure_channel
from deepserve.v1 import jobmgr_pb2 as jpb
from deepserve.v1 import jobmgr_pb2_grpc

Span = dict[str, object]


async def one_request(gateway_url: str, jobmgr: str, model: str, job_id: str) -> tuple[int, float]:
    """Creates the job at zero, sends one request; (start unix ns, TTFT seconds)."""
    async with insecure_channel(jobmgr, traced=False) as channel:
        jobs = jobmgr_pb2_grpc.JobManagerServiceStub(channel)
        spec = jpb.JobSpec(
            kind=jpb.JOB_KIND_SERVING,
            serving=jpb.ServingSpec(
                model=model, replicas=0, min_replicas=0, max_replicas=1,
                autoscaling=jpb.AutoscalingPolicy(enabled=True, scale_down_cooldown_s=3600),
            ),
        )  # fmt: skip
        await jobs.CreateJob(jpb.CreateJobRequest(spec=spec, job_id=job_id))
        await asyncio.sleep(1.0)  # the gateway's watch of deployments learns the job
        async with httpx.AsyncClient(base_url=gateway_url, timeout=120) as http:
            started_ns, started = time.time_ns(), time.monotonic()
            async with http.stream(
                "POST",
                "/v1/completions",
                json={"model": model, "prompt": "Hello", "max_tokens": 1, "stream": True},
            ) as reply:
                reply.raise_for_status()
                async for _ in reply.aiter_bytes():
                    ttft = time.monotonic() - started
                    break
        await jobs.DeleteJob(jpb.DeleteJobRequest(job_id=job_id))
    return started_ns, ttft


def spans_in(telemetry: Path, start_ns: int, end_ns: int) -> list[tuple[str, Span]]:
    found: list[tuple[str, Span]] = []
    for path in sorted(telemetry.glob("*.jsonl")):
        service = path.stem.rsplit("-", 1)[0]
        for line in path.read_text().splitlines():
            try:
                span = json.loads(line)
            except ValueError:
                continue
            if start_ns <= int(span["start_unix_ns"]) <= end_ns:
                found.append((service, span))
    return sorted(found, key=lambda s: int(s[1]["start_unix_ns"]))  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--allow-busy", action="store_true")
    args = parser.parse_args()
    print(machine_line())
    others = platform_processes()
    if others and not args.allow_busy:
        sys.exit(f"{len(others)} other platform processes are running; --allow-busy to go on")
    work = Path(tempfile.mkdtemp(prefix="bench-from-zero-"))
    cache = Path("/dev/shm") / f"bench-from-zero-{os.getpid()}"
    ttfts: list[float] = []
    try:
        with cluster(work / "run", 2, args.model, cache, 1) as layout:
            asyncio.run(wait_pool(layout, 2))
            for rep in range(args.reps):
                asyncio.run(wait_pool(layout, 2))
                started_ns, ttft = asyncio.run(
                    one_request(layout.gateway_url, layout.address("jobmgr"), args.model, f"z{rep}")
                )
                ttfts.append(ttft)
                progress(f"[from-zero] rep {rep + 1}/{args.reps}: TTFT {ttft:.3f}s")
            time.sleep(1.5)  # the span processors flush every 0.5 s
            window = spans_in(work / "run" / "telemetry", started_ns, started_ns + int(ttft * 1e9))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n## TTFT at zero replicas (warm pod, DRAM copy), {args.model}: {spread(ttfts)} s")
    print(f"median {statistics.median(ttfts):.3f} s of {len(ttfts)}\n")
    print(f"Spans that began within the last request ({ttft * 1000:.0f} ms):\n")
    rows = [
        [
            f"{(int(span['start_unix_ns']) - started_ns) / 1e6:.0f}",  # type: ignore[arg-type]
            f"{(int(span['end_unix_ns']) - int(span['start_unix_ns'])) / 1e6:.1f}",  # type: ignore[arg-type]
            service,
            span["name"],
        ]
        for service, span in window
    ]
    print(markdown_table(["at (ms)", "took (ms)", "process", "span"], rows))


if __name__ == "__main__":
    main()
