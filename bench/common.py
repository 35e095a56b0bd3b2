"""Small helpers shared by the benchmarks: percentiles, markdown tables, progress lines and a
memory-bandwidth probe."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

_START = time.perf_counter()


def progress(message: str) -> None:
    """One line on stderr, stamped with seconds since the benchmark started."""
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats are shown with 3 significant digits or 1 decimal."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for row in cells:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


@dataclass(frozen=True, slots=True)
class Bandwidth:
    """Best-of-N memory bandwidths in GB/s (1e9 bytes/s) over a buffer of `nbytes`."""

    nbytes: int
    # tensor.sum(): every byte read once, nothing written; the access pattern of a weight read.
    read_gbps: float
    # dst.copy_(src): bytes read plus bytes written, per second.
    copy_gbps: float


def measure_bandwidth(
    nbytes: int, device: torch.device | str = "cpu", repeats: int = 8
) -> Bandwidth:
    """Time sum() over, and copy_() between, float32 buffers of about nbytes each."""
    device = torch.device(device)
    numel = max(1, nbytes // 4)
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    # The first passes fault the pages in; best-of ignores them.
    read_s = min(timed(src.sum, device) for _ in range(repeats))
    copy_s = min(timed(lambda: dst.copy_(src), device) for _ in range(repeats))
    size = numel * 4
    return Bandwidth(nbytes=size, read_gbps=size / read_s / 1e9, copy_gbps=2 * size / copy_s / 1e9)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on an accelerator (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)  # type: ignore[attr-defined]


def timed(fn: Callable[[], object], device: torch.device | None = None) -> float:
    """Seconds one call of fn takes, its device work included."""
    if device is not None:
        synchronize(device)
    start = time.perf_counter()
    fn()
    if device is not None:
        synchronize(device)
    return time.perf_counter() - start
