"""The matmul behind every linear layer, chosen once per model for its device and dtype.

On CPU, oneDNN's matmul (`mkldnn::_linear_pointwise`, the op Inductor's CPU fusions emit) runs
the small-M shapes of decode 1.2-1.6x faster than `F.linear`'s MKL sgemm on the same plain
weights (bench/RESULTS.md, issue #19: 30 layers of SmolLM2 plus lm_head at M = 8, 2 threads:
41 ms against 65 ms), and no slower at prefill sizes.

oneDNN is faster still on weights reordered into its blocked layout (M = 8: 39 ms against 53 ms
plain; M = 32: 67 against 79), as vLLM's CPU backend keeps them. A reordered copy is private
memory beside the plain weights (which stay: forks stream them, and mapped DRAM copies stay
shared), and making it costs ~0.2 s of CPU for a 135M model, too long for a scale-from-zero
request to wait. So an instance starts on the plain weights and reorders a slice of them before
each forward step (`pack_some`), one layer's worth at a time, until all are done.

Decode-sized calls (a few rows) go to FlowServe's own kernel instead where it is built
(`kernels/skinny_linear`): it streams a second private copy of each weight, laid out in panels,
at close to the memory's speed, which oneDNN does not at those sizes (float32: 0.66-0.86x its
time at 1-32 rows, 0.70-0.78x at 40-64). That copy is made beside the reordered one, in the same steps. Prefill
keeps oneDNN, on the reordered copy (4% faster than the plain weights at 256-2048 rows).

The ops are private to torch, so they are probed at model load: they must exist and agree with
`F.linear` on a small problem, else `F.linear` is used. Everywhere else (CUDA, other dtypes)
`F.linear` is the kernel.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from deepserve.flowserve.kernels import skinny_linear

log = logging.getLogger(__name__)

Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

# "0" keeps F.linear on CPU (a comparison run, or a torch build whose oneDNN misbehaves).
ONEDNN_ENV = "DEEPSERVE_FLOWSERVE_ONEDNN_LINEAR"
# "0" keeps the plain weights (no reordered copy: less memory, slower decode).
PREPACK_ENV = "DEEPSERVE_FLOWSERVE_CPU_WEIGHT_PREPACK"
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
# Bytes of weights reordered before one step: a layer of a small model (~6 ms of CPU here).
PACK_BYTES_PER_STEP = 16 << 20


def _onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _reorder(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


def _onednn_agrees(dtype: torch.dtype) -> bool:
    """The ops exist in this build and match F.linear (plain and reordered weights, with and
    without bias) on a probe."""
    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(3, 40, generator=generator).to(dtype)
        weight = torch.randn(24, 40, generator=generator).to(dtype)
        bias = torch.randn(24, generator=generator).to(dtype)
        tolerance = 1e-4 if dtype == torch.float32 else 5e-2
        return all(
            torch.allclose(_onednn_linear(x, w, b), F.linear(x, weight, b), atol=tolerance)
            for w in (weight, _reorder(weight))
            for b in (None, bias)
        )
    except (RuntimeError, AttributeError) as exc:
        log.info("oneDNN linear unavailable, using F.linear: %s", exc)
        return False


class OneDNNLinear:
    """oneDNN's matmul, on reordered copies of the registered weights once they exist; calls
    of few rows on the skinny kernel's panels of them, where that kernel serves the dtype."""

    def __init__(self, prepack: bool, skinny_rows: int = 0) -> None:
        self._prepack = prepack
        # Calls of at most this many rows use the skinny kernel (0: never).
        self._skinny_rows = skinny_rows
        self._waiting: list[torch.Tensor] = []
        # id(plain weight) -> (the plain weight, kept so the id stays its own; its reordered
        # copy; its skinny panels or None)
        self._packed: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}

    def register(self, weights: Iterable[torch.Tensor]) -> None:
        """Weights to reorder (and pack into skinny panels) over the next steps, in order."""
        if self._prepack:
            self._waiting.extend(weights)

    @property
    def skinny_rows(self) -> int:
        """Calls of at most this many rows run on the skinny kernel once packed (0: none)."""
        return self._skinny_rows

    def panels(self, weight: torch.Tensor) -> torch.Tensor | None:
        """`weight`'s skinny panels once packed (None before, or where the kernel is off)."""
        packed = self._packed.get(id(weight))
        return None if packed is None else packed[2]

    @property
    def pending(self) -> int:
        return len(self._waiting)

    def pack_some(self, budget_bytes: int = PACK_BYTES_PER_STEP) -> None:
        """Reorder waiting weights until `budget_bytes` are done (at least one)."""
        done = 0
        while self._waiting and (done == 0 or done < budget_bytes):
            weight = self._waiting.pop(0)
            panels = skinny_linear.pack(weight) if self._skinny_rows else None
            self._packed[id(weight)] = (weight, _reorder(weight), panels)
            done += weight.numel() * weight.element_size()

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        packed = self._packed.get(id(weight))
        if packed is None:
            return _onednn_linear(x, weight, bias)
        panels = packed[2]
        if panels is not None and x.shape[0] <= self._skinny_rows:
            return skinny_linear.linear(x, panels, weight.shape[0], bias)
        return _onednn_linear(x, packed[1], bias)


def linear_kernel(device: torch.device, dtype: torch.dtype) -> Linear:
    """The linear function for weights of `dtype` on `device`."""
    if (
        device.type == "cpu"
        and dtype in _ONEDNN_DTYPES
        and os.environ.get(ONEDNN_ENV, "1") != "0"
        and torch.backends.mkldnn.is_available()
        and _onednn_agrees(dtype)
    ):
        prepack = os.environ.get(PREPACK_ENV, "1") != "0"
        skinny_rows = skinny_linear.max_rows(dtype)
        return OneDNNLinear(prepack=prepack, skinny_rows=skinny_rows if prepack else 0)
    return F.linear
