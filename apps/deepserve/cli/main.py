"""The `deepserve` command: the local cluster, the services, models, jobs."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from deepserve.errors import DeepServeError

SERVICE_COMMANDS = ("gateway", "jobmgr", "scheduler", "podpool", "flowserve")
# The module whose main() runs each service (what `python -m deepserve.<service>` runs).
SERVICE_ENTRY_POINTS = {
    "gateway": "deepserve.gateway.main",
    "jobmgr": "deepserve.jobmgr.main",
    "scheduler": "deepserve.scheduler.main",
    "podpool": "deepserve.podpool.main",
    "flowserve": "deepserve.flowserve.pod.main",
}
DEFAULT_MODEL = "smollm2-135m"
# `deepserve up --control-plane-nice`'s default.
CONTROL_PLANE_NICE_ENV = "DEEPSERVE_UP_CONTROL_PLANE_NICE"


def _add_up(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("up", help="start the local cluster and serve the default model")
    up.add_argument("--run-dir", type=Path, default=None, help="state and logs (~/.deepserve/run)")
    up.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model to deploy (catalog name or directory; default {DEFAULT_MODEL}; 'none': warm pods only)",
    )
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--free-ports", action="store_true", help="pick free ports for everything")
    for name, default in (
        ("etcd", 2379),
        ("etcd-peer", 2380),
        ("redis", 6379),
        ("http", 8000),
        ("gateway", 50050),
        ("jobmgr", 50051),
        ("scheduler", 50052),
        ("podpool", 50053),
    ):
        up.add_argument(f"--{name}-port", type=int, default=default)
    up.add_argument("--replicas", type=int, default=1, help="instances of the model to serve")
    up.add_argument("--warm-pods", type=int, default=1, help="pre-warmed pods kept spare")
    up.add_argument(
        "--pod-start",
        choices=("process", "zygote"),
        default="process",
        help="start pods as fresh processes, or fork them from a zygote that imported the runtime",
    )
    up.add_argument("--lease-ttl", type=int, default=5, help="seconds a dead process stays visible")
    up.add_argument(
        "--control-plane-nice",
        type=int,
        default=int(os.environ.get(CONTROL_PLANE_NICE_ENV, "0")),
        help="niceness added to etcd, Redis, scheduler, jobmgr and gateway, so engines sharing "
        f"their cores keep them (default: ${CONTROL_PLANE_NICE_ENV} or 0)",
    )
    up.add_argument(
        "--require-keys",
        action="store_true",
        help="the gateway refuses calls without a valid API key (401); default: open mode "
        "(no key needed) unless DEEPSERVE_GATEWAY_AUTH_OPEN=false",
    )
    up.add_argument(
        "--allow-open-remote",
        action="store_true",
        help="let an open-mode gateway listen on a non-loopback --host (anyone reaching it "
        "may use it)",
    )
    up.add_argument("--startup-timeout", type=float, default=60.0)


def _add_jobs(sub: argparse._SubParsersAction) -> None:
    def jobmgr_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--jobmgr", default=None, help="job manager address (from the run dir)")
        p.add_argument("--run-dir", type=Path, default=None)

    deploy = sub.add_parser("deploy", help="create a serving job (a model deployment)")
    deploy.add_argument("model")
    deploy.add_argument("--replicas", type=int, default=1)
    deploy.add_argument("--min", dest="min_replicas", type=int, default=0)
    deploy.add_argument("--max", dest="max_replicas", type=int, default=0)
    deploy.add_argument("--mode", choices=("colocated", "disaggregated"), default="colocated")
    deploy.add_argument("--prefill", type=int, default=1)
    deploy.add_argument("--decode", type=int, default=1)
    deploy.add_argument(
        "--policy",
        choices=("deepserve", "round_robin", "random", "least_loaded"),
        default="deepserve",
    )
    deploy.add_argument("--job-id", default="")
    deploy.add_argument("--autoscale", action="store_true", help="scale on load within [min, max]")
    deploy.add_argument(
        "--scale-to-zero-after",
        type=float,
        default=0.0,
        help="idle seconds before scaling to zero (needs --min 0)",
    )
    deploy.add_argument("--ttft-slo-ms", type=float, default=0.0)
    deploy.add_argument("--tpot-slo-ms", type=float, default=0.0)
    jobmgr_flag(deploy)
    jobs = sub.add_parser("jobs", help="list jobs")
    jobmgr_flag(jobs)
    job = sub.add_parser("job", help="show one job with its events")
    job.add_argument("job_id")
    jobmgr_flag(job)
    scale = sub.add_parser("scale", help="set a serving job's replicas")
    scale.add_argument("job_id")
    scale.add_argument("replicas", type=int)
    jobmgr_flag(scale)
    cancel = sub.add_parser("cancel", help="cancel a job")
    cancel.add_argument("job_id")
    jobmgr_flag(cancel)
    delete = sub.add_parser("delete", help="delete a job: stop its tasks, then remove it")
    delete.add_argument("job_id")
    jobmgr_flag(delete)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_up(sub)
    status = sub.add_parser("status", help="services, pods and instances, read from etcd")
    status.add_argument("--run-dir", type=Path, default=None)
    status.add_argument("--etcd", default=None, help="etcd endpoint (default: from the run dir)")
    from deepserve.cli.profile import add_arguments as add_profile_arguments

    add_profile_arguments(
        sub.add_parser("profile", help="measure a model's PD heatmap and store it in etcd")
    )
    trace = sub.add_parser("trace", help="print one request's span tree (request id or trace id)")
    trace.add_argument("id")
    trace.add_argument("--run-dir", type=Path, default=None)
    for name in SERVICE_COMMANDS:
        sub.add_parser(name, help=f"run the {name} service in this process (DEEPSERVE_* settings)")
    models = sub.add_parser("models", help="list, pull and locate models", add_help=False)
    models.add_argument("args", nargs=argparse.REMAINDER)
    adapters = sub.add_parser(
        "adapters", help="register, list and delete LoRA adapters", add_help=False
    )
    adapters.add_argument("args", nargs=argparse.REMAINDER)
    for name, help_text in (
        ("keys", "create, list and revoke API keys (etcd keeps only their hash)"),
        ("tenants", "set and list per-tenant limits"),
        ("usage", "prompt and completion tokens per tenant and model"),
    ):
        tenancy = sub.add_parser(name, help=help_text, add_help=False)
        tenancy.add_argument("args", nargs=argparse.REMAINDER)
    _add_jobs(sub)
    return parser


def _run_up(args: argparse.Namespace) -> int:
    from deepserve.cluster.launcher import LaunchOptions, run_cluster
    from deepserve.cluster.layout import ClusterLayout, ClusterPorts, default_run_dir

    if args.free_ports:
        ports = ClusterPorts.free()
    else:
        ports = ClusterPorts(
            etcd=args.etcd_port,
            etcd_peer=args.etcd_peer_port,
            redis=args.redis_port,
            gateway_http=args.http_port,
            gateway=args.gateway_port,
            jobmgr=args.jobmgr_port,
            scheduler=args.scheduler_port,
            podpool=args.podpool_port,
        )
    model = "" if args.model.lower() in ("", "none") else args.model
    if model and not Path(model).is_dir():
        _ensure_pulled(model)
    layout = ClusterLayout(
        run_dir=(args.run_dir or default_run_dir()).resolve(), host=args.host, ports=ports
    )
    options = LaunchOptions(
        layout=layout,
        model=model,
        replicas=args.replicas,
        warm_pods=args.warm_pods,
        pod_start=args.pod_start,
        lease_ttl_s=args.lease_ttl,
        startup_timeout_s=args.startup_timeout,
        auth_open=False if args.require_keys else None,
        allow_open_remote=args.allow_open_remote,
        control_plane_nice=args.control_plane_nice,
    )
    return asyncio.run(run_cluster(options, say=lambda line: print(line, flush=True)))


def _ensure_pulled(model: str) -> None:
    """Pulls a catalog model once, so `deepserve up` works on a fresh machine."""
    from deepserve.models.catalog import (
        default_cache_dir,
        find_catalog_model,
        is_model_dir,
        model_dir,
    )

    entry = find_catalog_model(model)
    if entry is None or is_model_dir(model_dir(entry, default_cache_dir())):
        return
    from deepserve.models.pull import pull_model

    print(f"[up] pulling {model} (once) ...", flush=True)
    pull_model(model, default_cache_dir(), progress=lambda line: print(line, flush=True))


def _run_dir(args: argparse.Namespace) -> Path:
    from deepserve.cluster.layout import default_run_dir

    return (args.run_dir or default_run_dir()).resolve()


def _cluster_address(args: argparse.Namespace, attr: str, service: str) -> str:
    explicit = getattr(args, attr, None)
    if explicit:
        return explicit
    from deepserve.cluster.layout import ClusterLayout

    try:
        layout = ClusterLayout.load(_run_dir(args))
    except FileNotFoundError:
        defaults = {"etcd": "127.0.0.1:2379", "jobmgr": "127.0.0.1:50051"}
        return defaults[service]
    return layout.etcd_endpoint if service == "etcd" else layout.address(service)


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if raw[:1] == ["models"]:
        from deepserve.cli.models import main as models_main

        return models_main(raw[1:])
    if raw[:1] == ["adapters"]:
        from deepserve.cli.adapters import main as adapters_main

        return adapters_main(raw[1:])
    from deepserve.cli.tenancy import COMMANDS as TENANCY_COMMANDS

    if raw[:1] and raw[0] in TENANCY_COMMANDS:
        from deepserve.cli.tenancy import main as tenancy_main

        return tenancy_main(raw)
    args = parser.parse_args(raw)
    try:
        if args.command == "up":
            return _run_up(args)
        if args.command in SERVICE_COMMANDS:
            importlib.import_module(SERVICE_ENTRY_POINTS[args.command]).main()
            return 0
        if args.command == "profile":
            from deepserve.cli import profile

            return asyncio.run(profile.run(args, _cluster_address(args, "etcd", "etcd")))
        if args.command == "trace":
            from deepserve.cli.trace_view import print_trace

            return print_trace(_run_dir(args) / "telemetry", args.id)
        if args.command == "status":
            from deepserve.cli.status import print_status

            return asyncio.run(print_status(_cluster_address(args, "etcd", "etcd")))
        from deepserve.cli import jobs

        address = _cluster_address(args, "jobmgr", "jobmgr")
        return asyncio.run(jobs.run(args, address))
    except DeepServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
