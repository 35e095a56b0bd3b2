"""A step's tokens from its logits in one pass per row (`token_sampling.cpp`), for CPU.

Greedy rows take the argmax; sampled rows draw from softmax(logits / temperature) by inverting
the row's CDF at one uniform, as the sampler's torch path does, without copying the logits or
materialising the CDF (9.5 ms to ~1 ms for 32 rows of a 49k vocabulary; bench/RESULTS.md,
issue #19). The sampler keeps its torch path where the kernel is not built, and on devices
other than the CPU.
"""

from __future__ import annotations

import logging

import torch

from deepserve.flowserve.kernels import library

log = logging.getLogger(__name__)

# "0" keeps the sampler's torch path.
KERNEL_ENV = "DEEPSERVE_FLOWSERVE_SAMPLING_KERNEL"


def available() -> bool:
    """The kernel is built, loaded, switched on, and agrees with the torch computation."""
    return library.op_usable(KERNEL_ENV, _agrees)


def sample_tokens(
    logits: torch.Tensor, inv_temperature: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """logits [rows, vocab] float32; inv_temperature [rows] (<= 0: greedy); uniform [rows] in
    [0, 1) -> int64 token ids [rows]. The logits are only read."""
    return torch.ops.deepserve_flowserve.sample_tokens(logits, inv_temperature, uniform)


def reference_sample_tokens(
    logits: torch.Tensor, inv_temperature: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """The same in torch, in float64: argmax, or the first token whose running weight passes
    u * total."""
    x = logits.double()
    out = x.argmax(dim=-1)
    for row in range(x.shape[0]):
        inv = float(inv_temperature[row])
        if inv <= 0:
            continue
        weights = ((x[row] - x[row].max()) * inv).exp()
        cdf = weights.cumsum(0)
        target = float(uniform[row]) * float(cdf[-1])
        index = int(
            torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64), right=True)
        )
        out[row] = min(index, x.shape[1] - 1)
    return out


def _agrees() -> bool:
    """Greedy rows match argmax; sampled rows match the float64 reference away from the
    boundaries between tokens (uniforms at the middle of a token's interval)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1000, generator=generator) * 3
    logits[2, 100:] = float("-inf")
    inv_temperature = torch.tensor([0.0, 1.0, 1.0, 2.0, 0.5, 1.0])
    # Uniforms at the middle of the interval of each row's token 7 (row 2: token 50).
    uniform = torch.zeros(6)
    for row in range(6):
        token = 50 if row == 2 else 7
        inv = float(inv_temperature[row]) or 1.0
        weights = ((logits[row].double() - logits[row].double().max()) * inv).exp()
        cdf = weights.cumsum(0)
        middle = (cdf[token] - weights[token] / 2) / cdf[-1]
        uniform[row] = float(middle)
    try:
        got = sample_tokens(logits, inv_temperature, uniform)
    except RuntimeError as exc:
        log.info("sampling kernel unavailable: %s", exc)
        return False
    want = reference_sample_tokens(logits, inv_temperature, uniform)
    if not torch.equal(got, want):
        log.warning("sampling kernel disagrees with torch (%s vs %s); not used", got, want)
        return False
    return True
