"""Generates Python, .pyi and gRPC code for protos/ into libs/ (`make protos`).

With --check, generates into a temporary folder and fails if libs/ differs, so a proto change
without regenerated code cannot pass the test command.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "libs"
GENERATED_DIR = Path("deepserve") / "v1"


def generate(out_dir: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def generated_files(root: Path) -> set[str]:
    return {
        str(p.relative_to(root))
        for p in (root / GENERATED_DIR).glob("*")
        if p.suffix in (".py", ".pyi") and p.name != "__init__.py"
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if libs/ is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_root = Path(tmp)
        generate(tmp_root)
        fresh, committed = generated_files(tmp_root), generated_files(OUT_ROOT)
        if args.check:
            stale = sorted(
                (fresh ^ committed)
                | {
                    f
                    for f in fresh & committed
                    if not filecmp.cmp(tmp_root / f, OUT_ROOT / f, False)
                }
            )
            if stale:
                print("generated proto code is stale; run `make protos`:", *stale, sep="\n  ")
                return 1
            print(f"generated proto code is current ({len(fresh)} files)")
            return 0
        for name in committed - fresh:
            (OUT_ROOT / name).unlink()
        for name in fresh:
            shutil.copyfile(tmp_root / name, OUT_ROOT / name)
        print(f"wrote {len(fresh)} files under libs/{GENERATED_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
