"""The C++ paged decode attention kernel for CPU: built once per host, loaded by each engine.

`paged_decode.cpp` attends one query token per sequence straight from the paged KV cache. The
Python path (`attention._decode_attention`) gathers every sequence's blocks into a buffer and
SDPA reads them again, so the cached keys and values cross memory three times; at 32 sequences
that was 39% of a decode step (bench/RESULTS.md, issue #19).

The kernel is compiled for this host's CPU (`-march=native`) with torch's extension builder into
a cache directory keyed by its source, torch's version and the CPU's flags. Engines never
compile: a pod that starts before the build exists keeps the Python path, so no request waits
on a compiler. `scripts/bootstrap.sh` (hence `up.sh` and `test.sh`) and `bench.serve_vs_vllm`
build it ahead with `python -m deepserve.flowserve.kernels`.

A loaded kernel is probed against the Python path at load, like the oneDNN linear.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# "0" keeps the gather + SDPA decode path even where the kernel is built.
KERNEL_ENV = "DEEPSERVE_FLOWSERVE_PAGED_DECODE_KERNEL"
# Where built kernels live; defaults beside the model cache.
CACHE_ENV = "DEEPSERVE_KERNEL_CACHE"
_SOURCE = Path(__file__).with_name("paged_decode.cpp")
# -fopenmp: ATen's parallel_for is inlined here and runs on one thread without it; the
# library then shares the libgomp.so.1 torch loaded (same soname), not a second runtime.
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math", "-fno-finite-math-only"]
_OP_NAMESPACE = "deepserve_flowserve"

_loaded: bool | None = None  # None: not tried in this process


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return os.uname().machine


def build_name() -> str:
    """The library's name: changes with anything that would change the machine code."""
    digest = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), torch.__version__.encode(), " ".join(_CFLAGS).encode()):
        digest.update(part)
    digest.update(_cpu_flags().encode())
    digest.update(sys.version.encode())
    return f"paged_decode_{digest.hexdigest()[:16]}"


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "deepserve" / "kernels")
    return Path(root) / build_name()


def library_path() -> Path:
    return cache_dir() / f"{build_name()}.so"


def build(verbose: bool = False) -> Path:
    """Compile the kernel into the cache (a no-op when it is there) and return the library.

    Raises whatever the compiler or torch's builder raises (no compiler, no ninja).
    """
    from torch.utils import cpp_extension  # imported here: engines that only load skip it

    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    if not library_path().exists():
        cpp_extension.load(
            name=build_name(),
            sources=[str(_SOURCE)],
            extra_cflags=_CFLAGS,
            build_directory=str(directory),
            is_python_module=False,
            verbose=verbose,
        )
    return library_path()


def _op_registered() -> bool:
    return hasattr(torch.ops, _OP_NAMESPACE) and hasattr(
        getattr(torch.ops, _OP_NAMESPACE), "paged_decode"
    )


def load() -> bool:
    """Load the built kernel once per process; False (Python path) when unbuilt or off."""
    global _loaded
    if _loaded is not None:
        return _loaded
    _loaded = False
    if os.environ.get(KERNEL_ENV, "1") == "0":
        return False
    path = library_path()
    if not path.exists():
        log.info("paged decode kernel not built (%s); using gather + SDPA", path)
        return False
    try:
        if not _op_registered():
            torch.ops.load_library(str(path))
        _loaded = _agrees()
    except (OSError, RuntimeError) as exc:
        log.warning("paged decode kernel failed to load, using gather + SDPA: %s", exc)
    return _loaded


def paged_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """query [seqs, heads, dim] over caches [blocks, block_size, kv_heads, dim] -> [seqs, heads, dim]."""
    return torch.ops.deepserve_flowserve.paged_decode(
        query, key_cache, value_cache, block_tables, context_lens, scale
    )


def reference_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The same attention written plainly, one sequence at a time, in float32."""
    seqs, heads, dim = query.shape
    _, block_size, kv_heads, _ = key_cache.shape
    out = torch.empty(seqs, heads, dim, dtype=torch.float32)
    for seq in range(seqs):
        length = int(context_lens[seq])
        blocks = block_tables[seq, : -(-length // block_size)]
        k = key_cache[blocks].reshape(-1, kv_heads, dim)[:length].float()
        v = value_cache[blocks].reshape(-1, kv_heads, dim)[:length].float()
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("hd,thd->ht", query[seq].float(), k) * scale
        out[seq] = torch.einsum("ht,thd->hd", scores.softmax(-1), v)
    return out.to(query.dtype)


def _agrees() -> bool:
    """The kernel matches the plain computation on a small ragged GQA problem, both dtypes."""
    generator = torch.Generator().manual_seed(0)
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        key_cache = torch.randn(6, 4, 2, 8, generator=generator).to(dtype)
        value_cache = torch.randn(6, 4, 2, 8, generator=generator).to(dtype)
        query = torch.randn(3, 6, 8, generator=generator).to(dtype)
        tables = torch.tensor([[5, 1, 2], [0, 0, 0], [3, 4, 0]])
        lens = torch.tensor([11, 1, 6])
        got = paged_decode(query, key_cache, value_cache, tables, lens, 0.35)
        want = reference_decode(query, key_cache, value_cache, tables, lens, 0.35)
        if not torch.allclose(got.float(), want.float(), atol=tolerance, rtol=tolerance):
            log.warning("paged decode kernel disagrees with the reference; not used")
            return False
    return True


def main() -> int:
    """Build the kernel for this host (once; later runs find it in the cache)."""
    if library_path().exists():
        print(f"[kernels] paged decode attention: built ({library_path()})")
        return 0
    print("[kernels] building the paged decode attention kernel for this CPU (once, ~1 min)")
    started = time.monotonic()
    try:
        path = build(verbose="-v" in sys.argv)
    except Exception as exc:  # any build failure leaves the Python path in use
        print(f"[kernels] build failed; engines use gather + SDPA instead: {exc}")
        return 1
    print(f"[kernels] built {path} in {time.monotonic() - started:.0f} s")
    return 0
