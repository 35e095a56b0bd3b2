"""`deepserve models ...` commands: list the catalog, pull a model, print a model's directory."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from deepserve.errors import DeepServeError
from deepserve.models.catalog import CATALOG, default_cache_dir, is_model_dir, model_dir
from deepserve.models.catalog import resolve_model as _resolve_model


class _ProgressPrinter:
    """Prints pull progress; on a terminal, repeated per-tensor lines overwrite one another."""

    def __init__(self) -> None:
        self._overwriting = False

    def __call__(self, line: str) -> None:
        if sys.stdout.isatty() and line.startswith(("[convert]", "[extract]")):
            print(f"\r{line}", end="", flush=True)
            self._overwriting = True
            return
        if self._overwriting:
            print()
            self._overwriting = False
        print(line, flush=True)


def build_parser(prog: str = "deepserve models") -> argparse.ArgumentParser:
    """The argument parser; the top-level CLI can mount it as its `models` subcommand."""
    parser = argparse.ArgumentParser(prog=prog, description="Manage locally cached models.")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="model cache (default: $DEEPSERVE_MODEL_CACHE or ~/.cache/deepserve/models)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="known models and whether each is pulled")
    pull = commands.add_parser("pull", help="download and convert a model into the cache")
    pull.add_argument("name")
    pull.add_argument("--force", action="store_true", help="convert again even if present")
    path = commands.add_parser("path", help="print the directory of a pulled model")
    path.add_argument("name")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one models command; returns the process exit code."""
    args = build_parser().parse_args(argv)
    cache_dir: Path = args.cache_dir or default_cache_dir()
    try:
        if args.command == "list":
            for model in CATALOG.values():
                pulled = "pulled" if is_model_dir(model_dir(model, cache_dir)) else "not pulled"
                print(f"{model.name}\t{pulled}\t{model.license}\t{model.description}")
        elif args.command == "pull":
            from deepserve.models.pull import pull_model  # needs gguf/numpy; list/path do not

            model_path = pull_model(
                args.name, cache_dir, progress=_ProgressPrinter(), force=args.force
            )
            print(model_path)
        elif args.command == "path":
            print(_resolve_model(args.name, cache_dir))
    except DeepServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
