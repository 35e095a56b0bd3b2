"""`deepserve adapters register|delete|list`: LoRA adapters, through jobmgr's API.

    deepserve adapters register NAME --model BASE --path DIR --tenant acme
    deepserve adapters list [--tenant acme]
    deepserve adapters delete NAME --tenant acme

DIR holds PEFT's adapter_config.json and adapter_model.safetensors and must be readable by the
base model's instances (the same filesystem). jobmgr checks the files against the base model and
refuses with the reason. jobmgr is found in the local cluster's run directory unless --jobmgr
names it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from deepserve.adapters.records import AdapterRecord
from deepserve.errors import DeepServeError
from deepserve.jobs.client import JobManagerClient


def build_parser(prog: str = "deepserve adapters") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="LoRA adapters served as models.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--run-dir", type=Path, default=None, help="local cluster run directory")
    common.add_argument("--jobmgr", default=None, help="jobmgr address host:port")
    actions = parser.add_subparsers(dest="action", required=True)
    register = actions.add_parser("register", parents=[common], help="register an adapter")
    register.add_argument("name", help="the model name requests use")
    register.add_argument("--model", required=True, help="the base model it was trained on")
    register.add_argument("--path", required=True, type=Path, help="directory of PEFT files")
    register.add_argument("--tenant", required=True, help="the tenant that owns it")
    listing = actions.add_parser("list", parents=[common], help="list adapters")
    listing.add_argument("--tenant", default="", help="only this tenant's")
    delete = actions.add_parser("delete", parents=[common], help="delete an adapter")
    delete.add_argument("name")
    delete.add_argument("--tenant", required=True)
    return parser


def _jobmgr_address(args: argparse.Namespace) -> str:
    if args.jobmgr:
        return str(args.jobmgr)
    from deepserve.cluster.layout import ClusterLayout, default_run_dir

    return ClusterLayout.load(args.run_dir or default_run_dir()).address("jobmgr")


def _line(record: AdapterRecord) -> str:
    created = time.strftime("%Y-%m-%d %H:%M", time.localtime(record.created_at))
    return (
        f"{record.name:<32} {record.tenant:<12} base {record.base_model:<20} rank {record.rank:<3} "
        f"{record.source:<11} {created}  {record.path}"
    )


async def run(args: argparse.Namespace) -> int:
    client = JobManagerClient(_jobmgr_address(args))
    try:
        if args.action == "register":
            record = await client.register_adapter(
                AdapterRecord(
                    name=args.name,
                    tenant=args.tenant,
                    base_model=args.model,
                    path=str(args.path.resolve()),
                    rank=0,
                )
            )
            print(_line(record))
        elif args.action == "list":
            for record in await client.list_adapters(args.tenant):
                print(_line(record))
        else:
            await client.delete_adapter(args.tenant, args.name)
            print(f"deleted {args.name}")
    finally:
        await client.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(run(args))
    except DeepServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
