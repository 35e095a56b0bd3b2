"""`bench.scaling`'s burst (0 -> N instances through the whole control plane) with the pods
spread over namespace hosts (issue #16): `python -m bench.hosts --hosts 2 --burst 32`.

The control plane runs on its own network-namespace host, and each of `--hosts` pod hosts runs
a host agent (podpool's `hosts` backend spreads the warm pods over them); every byte between
them crosses veth links in 198.18.0.0/15 (tests/multihost/netns.py). The same burst on one pod
host runs first in the same invocation, as the baseline. Each pod host has its own weights
cache, so a host's first instance loads the disk (or forks across hosts) and the host's later
ones map the copy it seeded. Needs root.

    .venv/bin/python -m bench.hosts --hosts 2 --burst 32        # tiny random Llama
    .venv/bin/python -m bench.hosts --hosts 2 --burst 32 --burst-model smollm2-135m
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import markdown_table, progress
from bench.scaling import KV_BLOCKS, burst, wait_pool
from deepserve import records
from deepserve.store.etcd import EtcdStore

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.multihost.cluster import multihost_cluster


async def pods_per_host(etcd_endpoint: str) -> dict[str, int]:
    async with EtcdStore(etcd_endpoint) as etcd:
        found, _ = await records.pods(etcd).list()
    return dict(sorted(Counter(v.record.host for v in found).items()))


def one_run(work: Path, hosts: int, n: int, model: str, pod_threads: int) -> dict[str, Any]:
    env = {
        "DEEPSERVE_PODPOOL_MAX_PODS": str(n + 4),
        "DEEPSERVE_PODPOOL_POD_THREADS": str(pod_threads),
        "DEEPSERVE_PODPOOL_POD_OPENMP_SPIN_COUNT": "20000",
        "DEEPSERVE_PODPOOL_DRAM_MODELS": model,
        "DEEPSERVE_FLOWSERVE_KV_CACHE_BLOCKS": KV_BLOCKS,
        "DEEPSERVE_FLOWSERVE_LOAD_REPORT_INTERVAL_S": "2",
        "DEEPSERVE_JOBMGR_AUTOSCALE_INTERVAL_S": "0.5",
        "DEEPSERVE_GATEWAY_SCALE_FROM_ZERO_TIMEOUT_S": "120",
        "DEEPSERVE_LOG_LEVEL": "WARNING",
        # podpool's own DRAM copy (on the control host, where no pod runs) only lets
        # bench.scaling's pool check pass; the pod hosts keep their own caches.
        "DEEPSERVE_PODPOOL_WEIGHTS_CACHE_DIR": str(Path("/dev/shm") / f"bench-hosts-{os.getpid()}"),
    }
    names = [f"h{i + 1}" for i in range(hosts)]
    load = os.getloadavg()[0]
    with multihost_cluster(
        work / f"run-{hosts}", names, warm_pods=n, lease_ttl_s=5, env=env, timeout_s=600
    ) as cluster:
        progress(f"[hosts] {hosts} host(s): waiting for {n} warm pods")
        t = time.monotonic()
        asyncio.run(wait_pool(cluster.layout, n))
        pool_s = time.monotonic() - t
        spread = asyncio.run(pods_per_host(cluster.layout.etcd_endpoint))
        progress(f"[hosts] warm pods per host {spread}; burst 0 -> {n}")
        result = asyncio.run(burst(cluster.layout, model, n))
    shutil.rmtree(env["DEEPSERVE_PODPOOL_WEIGHTS_CACHE_DIR"], ignore_errors=True)
    return {**result, "pool_s": pool_s, "spread": spread, "load": load}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--burst", type=int, default=32)
    parser.add_argument("--burst-model", default="tiny", help="'tiny' or a model name/path")
    parser.add_argument("--burst-pod-threads", type=int, default=1)
    parser.add_argument("--no-baseline", action="store_true", help="skip the 1-host run")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench.hosts makes network namespaces: run it as root")
    work = Path(tempfile.mkdtemp(prefix="bench-hosts-"))
    try:
        model = args.burst_model
        if model == "tiny":
            from tests.tiny_model import make_tiny_llama

            model = str(make_tiny_llama(work / "tiny-llama"))
        counts = [args.hosts] if args.no_baseline or args.hosts == 1 else [1, args.hosts]
        runs = {h: one_run(work, h, args.burst, model, args.burst_pod_threads) for h in counts}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    name = "tiny random Llama" if args.burst_model == "tiny" else args.burst_model
    print(
        f"\n## Burst 0 -> {args.burst} across namespace hosts ({name}, zygote pods, "
        f"{args.burst_pod_threads} thread(s) per pod, {os.cpu_count()} cores in all)\n"
    )
    figures = [
        ("warm pods per host", "spread"),
        ("pool filled (s)", "pool_s"),
        ("first instance served (s)", "first_served_s"),
        ("half served (s)", "half_served_s"),
        (f"all {args.burst} served (s)", "all_served_s"),
        ("median steps (s)", "median_steps"),
        ("weights sources", "weights"),
        ("TTFT at zero replicas (s)", "ttft_at_zero_s"),
        ("load average at start", "load"),
    ]
    headers = ["figure", *(f"{h} host(s)" for h in runs)]
    rows = [[label, *(runs[h][key] for h in runs)] for label, key in figures]
    if len(runs) == 2:
        one, many = runs[1]["all_served_s"], runs[args.hosts]["all_served_s"]
        rows.append([f"all served, {args.hosts} hosts / 1 host", "", f"{many / one:.2f}"])
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
