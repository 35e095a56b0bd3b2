"""FlowServe's native CPU kernels as one library: built once per host, loaded by each engine.

The C++ sources beside this file (`paged_decode.cpp`, `paged_prefill.cpp`, `fused_layer_ops.cpp`,
`skinny_linear.cpp`, `token_sampling.cpp`, `decode_layers.cpp`) are compiled for this host's CPU (`-march=native`) by
torch's extension builder into a cache directory keyed by the sources, torch's version, the
flags and the CPU's features. Engines never compile: a pod that starts before the build exists
keeps its pure-torch paths, so no request waits on a compiler.
`scripts/bootstrap.sh` (hence `up.sh` and `test.sh`) and `bench.serve_vs_vllm` build it ahead
with `python -m deepserve.flowserve.kernels`.

Each op's module probes its kernel against a plain computation before a model uses it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# "0": load nothing (every model keeps its pure-torch paths), e.g. for a comparison run.
KERNELS_ENV = "DEEPSERVE_FLOWSERVE_CPU_KERNELS"
# Where built libraries live.
CACHE_ENV = "DEEPSERVE_KERNEL_CACHE"
_HEADERS = tuple(
    Path(__file__).with_name(name)
    for name in ("scalar_math.h", "amx_tiles.h", "vec16.h", "shared_work.h", "layer_kernels.h")
)
SOURCES = tuple(
    Path(__file__).with_name(name)
    for name in (
        "paged_decode.cpp",
        "paged_prefill.cpp",
        "fused_layer_ops.cpp",
        "skinny_linear.cpp",
        "token_sampling.cpp",
        "decode_layers.cpp",
    )
)
# -fopenmp: ATen's parallel_for is inlined into the library and runs on one thread without it;
# the library then shares the libgomp.so.1 torch loaded (same soname), not a second runtime.
# -ffast-math vectorises exp (softmax); finite-math stays off for the -inf of masked scores.
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math", "-fno-finite-math-only"]

_loaded: bool | None = None  # None: not tried in this process


@functools.cache
def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return os.uname().machine


def cpu_has(flag: str) -> bool:
    """Whether /proc/cpuinfo lists `flag` (e.g. "amx_bf16") for this CPU."""
    return flag in _cpu_flags().split()


def build_name() -> str:
    """The library's name: changes with anything that would change the machine code."""
    digest = hashlib.sha256()
    for source in (*SOURCES, *_HEADERS):
        digest.update(source.read_bytes())
    for part in (torch.__version__, " ".join(_CFLAGS), _cpu_flags(), sys.version):
        digest.update(part.encode())
    return f"flowserve_cpu_{digest.hexdigest()[:16]}"


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "deepserve" / "kernels")
    return Path(root) / build_name()


def library_path() -> Path:
    return cache_dir() / f"{build_name()}.so"


def build(verbose: bool = False) -> Path:
    """Compile the library into the cache (a no-op when it is there) and return its path.

    Raises whatever the compiler or torch's builder raises (no compiler, no ninja).
    """
    from torch.utils import cpp_extension  # imported here: engines that only load skip it

    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    if not library_path().exists():
        cpp_extension.load(
            name=build_name(),
            sources=[str(source) for source in SOURCES],
            extra_cflags=_CFLAGS,
            extra_include_paths=[str(Path(__file__).parent)],
            build_directory=str(directory),
            is_python_module=False,
            verbose=verbose,
        )
    return library_path()


def load() -> bool:
    """Load the built library once per process; False when unbuilt, switched off or broken."""
    global _loaded
    if _loaded is not None:
        return _loaded
    _loaded = False
    if os.environ.get(KERNELS_ENV, "1") == "0":
        return False
    path = library_path()
    if not path.exists():
        log.info("FlowServe CPU kernels not built (%s); using pure-torch paths", path)
        return False
    try:
        if not hasattr(torch.ops.deepserve_flowserve, "paged_decode"):
            torch.ops.load_library(str(path))
        _loaded = True
    except (OSError, RuntimeError) as exc:
        log.warning("FlowServe CPU kernels failed to load, using pure-torch paths: %s", exc)
    return _loaded


_usable: dict[str, bool] = {}


def op_usable(switch_env: str, agrees: Callable[[], bool]) -> bool:
    """An op's kernels serve: the library is loaded, `switch_env` is not "0", and `agrees()`
    (the op's probe against a plain computation) passed; decided once per process."""
    if switch_env not in _usable:
        _usable[switch_env] = os.environ.get(switch_env, "1") != "0" and load() and agrees()
    return _usable[switch_env]


def main() -> int:
    """Build the library for this host (once; later runs find it in the cache)."""
    if library_path().exists():
        print(f"[kernels] FlowServe CPU kernels: built ({library_path()})")
        return 0
    print("[kernels] building FlowServe's CPU kernels for this CPU (once, ~20 s)")
    started = time.monotonic()
    try:
        path = build(verbose="-v" in sys.argv)
    except Exception as exc:  # any build failure leaves the pure-torch paths in use
        print(f"[kernels] build failed; engines use their pure-torch paths instead: {exc}")
        return 1
    print(f"[kernels] built {path} in {time.monotonic() - started:.0f} s")
    return 0
