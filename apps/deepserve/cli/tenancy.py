"""`deepserve keys|tenants|usage ...`: API keys, per-tenant limits, and accumulated usage.

    deepserve keys create --tenant acme [--name ci]   prints the new key once
    deepserve keys list [--tenant acme]
    deepserve keys revoke KEY_ID
    deepserve tenants set-limits acme --rpm 60 --tpm 100000 --concurrent 8
    deepserve tenants list
    deepserve usage [--tenant acme] [--model M]

The stores are found in the local cluster's run directory (cluster.json), unless --etcd /
--redis name them.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from deepserve.config import CommonSettings
from deepserve.errors import DeepServeError
from deepserve.store.etcd import EtcdStore
from deepserve.store.redis_store import RedisStore
from deepserve.tenancy.api_keys import ApiKeys
from deepserve.tenancy.tenants import TenantLimits, Tenants
from deepserve.tenancy.usage import UsageMeter

COMMANDS = ("keys", "tenants", "usage")


def build_parser(prog: str = "deepserve") -> argparse.ArgumentParser:
    """The parser for argv starting with one of COMMANDS; the top-level CLI can mount it."""
    parser = argparse.ArgumentParser(prog=prog, description="Tenants, API keys and usage.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--run-dir", type=Path, default=None, help="local cluster run directory")
    common.add_argument("--etcd", default=None, help="etcd endpoint host:port")
    common.add_argument("--redis", default=None, help="Redis URL")
    commands = parser.add_subparsers(dest="command", required=True)

    keys = commands.add_parser("keys", help="create, list and revoke API keys")
    key_cmds = keys.add_subparsers(dest="action", required=True)
    create = key_cmds.add_parser("create", parents=[common], help="create a key (shown once)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", default="", help="a label for the key")
    listing = key_cmds.add_parser("list", parents=[common], help="list keys (ids, not keys)")
    listing.add_argument("--tenant", default=None)
    revoke = key_cmds.add_parser("revoke", parents=[common], help="revoke a key by its id")
    revoke.add_argument("key_id")

    tenants = commands.add_parser("tenants", help="per-tenant limits")
    tenant_cmds = tenants.add_subparsers(dest="action", required=True)
    limits = tenant_cmds.add_parser("set-limits", parents=[common], help="0 means unlimited")
    limits.add_argument("tenant")
    limits.add_argument("--rpm", type=int, default=0, help="requests per minute")
    limits.add_argument("--tpm", type=int, default=0, help="tokens per minute")
    limits.add_argument("--concurrent", type=int, default=0, help="requests at once")
    tenant_cmds.add_parser("list", parents=[common], help="tenants and their limits")

    usage = commands.add_parser("usage", parents=[common], help="tokens used per tenant and model")
    usage.add_argument("--tenant", default=None)
    usage.add_argument("--model", default=None)
    return parser


def _endpoints(args: argparse.Namespace) -> tuple[str, str]:
    settings = CommonSettings()
    etcd, redis = settings.etcd_endpoint, settings.redis_url
    from deepserve.cluster.layout import ClusterLayout, default_run_dir

    run_dir = (args.run_dir or default_run_dir()).resolve()
    try:
        layout = ClusterLayout.load(run_dir)
        etcd, redis = layout.etcd_endpoint, layout.redis_url
    except FileNotFoundError:
        pass
    return args.etcd or etcd, args.redis or redis


def _limits_text(limits: TenantLimits) -> str:
    def show(value: int) -> str:
        return str(value) if value else "unlimited"

    return (
        f"rpm {show(limits.requests_per_min)}  tpm {show(limits.tokens_per_min)}  "
        f"concurrent {show(limits.max_concurrent)}"
    )


async def _run(args: argparse.Namespace) -> int:
    etcd_endpoint, redis_url = _endpoints(args)
    if args.command == "usage":
        async with RedisStore(redis_url) as redis:
            rows = await UsageMeter(redis.client).read(args.tenant, args.model)
        print(f"{'TENANT':<20} {'MODEL':<28} {'REQUESTS':>9} {'PROMPT':>10} {'COMPLETION':>11}")
        for row in rows:
            print(
                f"{row.tenant:<20} {row.model:<28} {row.requests:>9} "
                f"{row.prompt_tokens:>10} {row.completion_tokens:>11}"
            )
        return 0
    async with EtcdStore(etcd_endpoint) as etcd:
        if args.command == "keys":
            keys = ApiKeys(etcd)
            if args.action == "create":
                await Tenants(etcd).ensure(args.tenant)
                key, record = await keys.create(args.tenant, args.name)
                print(key)
                print(
                    f"key id {record.key_id} for tenant {record.tenant}; "
                    "store the key now, it is not shown again",
                    file=sys.stderr,
                )
            elif args.action == "list":
                for k in sorted(await keys.list(args.tenant), key=lambda k: k.created_at):
                    print(f"{k.key_id}  {k.tenant:<20} {k.name}")
            else:
                revoked = await keys.revoke(args.key_id)
                print(f"revoked {revoked.key_id} of tenant {revoked.tenant}")
            return 0
        tenants = Tenants(etcd)
        if args.action == "set-limits":
            record = await tenants.set_limits(
                args.tenant,
                TenantLimits(
                    requests_per_min=args.rpm,
                    tokens_per_min=args.tpm,
                    max_concurrent=args.concurrent,
                ),
            )
            print(f"{record.tenant}: {_limits_text(record.limits)}")
        else:
            for record in sorted(await tenants.list(), key=lambda r: r.tenant):
                print(f"{record.tenant:<20} {_limits_text(record.limits)}")
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command (argv starts with keys, tenants or usage); returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except DeepServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # pydantic: negative limits
        print(f"error: {exc}", file=sys.stderr)
        return 2
