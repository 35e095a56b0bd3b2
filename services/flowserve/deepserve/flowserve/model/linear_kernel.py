"""The matmul behind every linear layer, chosen once per model for its device and dtype.

On CPU, oneDNN's matmul (`mkldnn::_linear_pointwise`, the op Inductor's CPU fusions emit) runs
the small-M shapes of decode 1.2-1.6x faster than `F.linear`'s MKL sgemm on the same plain
weights (bench/RESULTS.md, issue #19: 30 layers of SmolLM2 plus lm_head at M = 8, 2 threads:
41 ms against 65 ms), and no slower at prefill sizes. It reads the weights where they lie (no
repacked copy), so weights mapped from the host's shared DRAM copy stay shared.

The op is private to torch, so it is probed at model load: it must exist and agree with
`F.linear` on a small problem, else `F.linear` is used. Everywhere else (CUDA, other dtypes)
`F.linear` is the kernel.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

# Set to "0" to keep F.linear on CPU (a comparison run, or a torch build whose oneDNN misbehaves).
ONEDNN_ENV = "DEEPSERVE_FLOWSERVE_ONEDNN_LINEAR"
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


def _onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _onednn_agrees(dtype: torch.dtype) -> bool:
    """The op exists in this build and matches F.linear (with and without bias) on a probe."""
    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(3, 40, generator=generator).to(dtype)
        weight = torch.randn(24, 40, generator=generator).to(dtype)
        bias = torch.randn(24, generator=generator).to(dtype)
        tolerance = 1e-4 if dtype == torch.float32 else 5e-2
        return all(
            torch.allclose(_onednn_linear(x, weight, b), F.linear(x, weight, b), atol=tolerance)
            for b in (None, bias)
        )
    except (RuntimeError, AttributeError) as exc:
        log.info("oneDNN linear unavailable, using F.linear: %s", exc)
        return False


def linear_kernel(device: torch.device, dtype: torch.dtype) -> Linear:
    """The linear function for weights of `dtype` on `device`."""
    if (
        device.type == "cpu"
        and dtype in _ONEDNN_DTYPES
        and os.environ.get(ONEDNN_ENV, "1") != "0"
        and torch.backends.mkldnn.is_available()
        and _onednn_agrees(dtype)
    ):
        return _onednn_linear
    return F.linear
