"""Linear layers for the few rows of a decode step (`skinny_linear.cpp`), for CPU.

A decode step reads every weight once for a handful of rows, so its matmuls are bound by how
fast weights stream from memory. The kernel keeps each weight in panels of 32 output columns
(a private copy made by `pack`) and streams them once per call with prefetching; oneDNN, built
for reuse, read SmolLM2's weights slower at these sizes (bench/RESULTS.md, issue #19). In
bfloat16 on hosts with AMX the panels feed tile products directly. Above `max_rows(dtype)` rows
(prefill, large batches; bfloat16 beyond a few rows where oneDNN has AMX and we do not) the
caller keeps oneDNN.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from deepserve.flowserve.kernels import library

log = logging.getLogger(__name__)

# "0" keeps oneDNN for every matmul.
KERNEL_ENV = "DEEPSERVE_FLOWSERVE_SKINNY_LINEAR"
# Rows up to which the kernel beats oneDNN (30 layers of SmolLM2 + lm_head, 2 threads, this
# project's Intel AMX host): float32 0.66-0.86x oneDNN's time at 1-32 rows, and 0.70-0.78x at
# 40-64 once the next chunk of weights is prefetched across a chunk's row tiles; bfloat16 by
# vdpbf16ps 0.61-0.78x at 1-4 rows, slower from 6 (oneDNN's AMX tiles take over); bfloat16 on
# AMX tiles 0.58-0.61x at 1-32 rows (the kernel's AMX path takes up to 32).
_MAX_ROWS = {torch.float32: 64, torch.bfloat16: 4}
_MAX_ROWS_AMX = 32
# bfloat16 on a CPU without AMX: oneDNN's bfloat16 matmuls have no tiles to take over from ~6
# rows, and the vdpbf16ps path ran the same chain at 0.29-0.57x oneDNN's time at 8-64 rows
# (2-core AMD EPYC, Zen 4), as float32's does.
_MAX_ROWS_BF16_WITHOUT_AMX = 64
# float32 on a CPU without AVX-512 (AVX2 and FMA: the kernel's register tiles hold 2 rows, not 8):
# 0.47-0.68x oneDNN's time at 1-8 rows, 0.77-0.92x at 16-32, 1.0-1.18x at 40-64 (2-core AMD
# EPYC, Zen 3).
_MAX_ROWS_FLOAT32_AVX2 = 32


def available(dtype: torch.dtype) -> bool:
    """The kernel is built, loaded, switched on, agrees with F.linear, and serves `dtype`."""
    return library.op_usable(KERNEL_ENV, _agrees) and dtype in _usable_dtypes


def max_rows(dtype: torch.dtype) -> int:
    """Most rows a call should bring to the kernel rather than to oneDNN (0: it does not serve
    `dtype` here)."""
    if not available(dtype):
        return 0
    if dtype == torch.bfloat16:
        if torch.ops.deepserve_flowserve.amx_tiles():
            return _MAX_ROWS_AMX
        if not library.cpu_has("amx_bf16"):
            return _MAX_ROWS_BF16_WITHOUT_AMX
    if dtype == torch.float32 and not library.cpu_has("avx512f"):
        return _MAX_ROWS_FLOAT32_AVX2
    return _MAX_ROWS.get(dtype, 0)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] -> its panels (a new tensor, the kernel's layout)."""
    return torch.ops.deepserve_flowserve.skinny_pack(weight)


def linear(
    x: torch.Tensor, panels: torch.Tensor, out_features: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [M <= 64, K] @ weight.T (+ bias) from the weight's panels -> [M, out_features]."""
    return torch.ops.deepserve_flowserve.skinny_linear(x, panels, out_features, bias)


_usable_dtypes: set[torch.dtype] = set()


def _agrees() -> bool:
    """Matches F.linear on ragged shapes (rows, a partial panel, bias), float32 and bfloat16;
    bfloat16 only where the CPU has avx512_bf16 (the kernel is not built for it otherwise)."""
    generator = torch.Generator().manual_seed(0)
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        weight = torch.randn(45, 300, generator=generator).to(dtype)
        bias = torch.randn(45, generator=generator).to(dtype)
        try:
            panels = pack(weight)
            ok = True
            for rows in (1, 5, 9, 17):
                x = torch.randn(rows, 300, generator=generator).to(dtype)
                for b in (None, bias):
                    want = F.linear(x.float(), weight.float(), None if b is None else b.float())
                    got = linear(x, panels, 45, b).float()
                    ok = ok and torch.allclose(got, want, atol=tolerance, rtol=tolerance)
        except RuntimeError as exc:
            log.info("skinny linear kernel does not serve %s: %s", dtype, exc)
            continue
        if not ok:
            log.warning("skinny linear kernel disagrees with F.linear (%s); not used", dtype)
            return False
        _usable_dtypes.add(dtype)
    return bool(_usable_dtypes)
