"""A decoder layer's elementwise work, fused (`fused_layer_ops.cpp`), for CPU.

RMSNorm (alone, or after the residual add), SiLU-and-multiply and rotary embedding, each one
pass in float arithmetic instead of several eager kernels that, in bfloat16, each convert to
float and back (30% of a bfloat16 prefill step before; bench/RESULTS.md, issue #19). And the
store of a step's keys and values into the paged cache, a memcpy per token where index_copy_
walked them element by element.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from deepserve.flowserve.kernels import library

log = logging.getLogger(__name__)

# "0" keeps the eager torch ops.
KERNEL_ENV = "DEEPSERVE_FLOWSERVE_FUSED_LAYER_OPS"


def available() -> bool:
    """The kernels are built, loaded, switched on, and agree with the eager ops."""
    return library.op_usable(KERNEL_ENV, _agrees)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.ops.deepserve_flowserve.rms_norm(x, weight, eps)


def add_rms_norm(
    residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """residual += x in place; returns RMSNorm of the new residual."""
    return torch.ops.deepserve_flowserve.add_rms_norm(residual, x, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[tokens, 2 * inter] (gate, up) -> silu(gate) * up."""
    return torch.ops.deepserve_flowserve.silu_mul(gate_up)


def rotary_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate x [tokens, heads, head_dim] in place; cos/sin float32 [positions, head_dim / 2]."""
    torch.ops.deepserve_flowserve.rotary_(x, positions, cos, sin)


def write_kv_(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slots: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
) -> None:
    """Store key/value [tokens, kv_heads, head_dim] at flat slots of one layer's paged cache."""
    torch.ops.deepserve_flowserve.write_kv_(key_cache, value_cache, slots, key, value)


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMSNorm: float statistics, normalised row rounded, then weighted."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def reference_rotary(
    x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    half = x.shape[-1] // 2
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def _agrees() -> bool:
    """Each op matches its eager reference on a small problem, float32 and bfloat16."""
    generator = torch.Generator().manual_seed(0)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):

        def close(got: torch.Tensor, want: torch.Tensor, tol: float = tolerance) -> bool:
            return torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)

        x = torch.randn(5, 40, generator=generator).to(dtype)
        weight = torch.randn(40, generator=generator).to(dtype)
        delta = torch.randn(5, 40, generator=generator).to(dtype)
        residual = x.clone()
        normed = add_rms_norm(residual, delta, weight, 1e-5)
        gate_up = torch.randn(5, 24, generator=generator).to(dtype)
        gate, up = gate_up.chunk(2, dim=-1)
        positions = torch.tensor([0, 3, 1, 7, 2])
        angles = torch.rand(8, 4, generator=generator) * 6
        qk = torch.randn(5, 3, 8, generator=generator).to(dtype)
        rotated = qk.clone()
        rotary_(rotated, positions, angles.cos(), angles.sin())
        key_cache, value_cache = torch.zeros(2, 4, 2, 2, 3, dtype=dtype).unbind(0)
        kv = torch.randn(3, 2, 2, 2, 3, generator=generator).to(dtype)  # strided, as qkv slices
        slots = torch.tensor([5, 0, 7])
        write_kv_(key_cache, value_cache, slots, kv[:, 0, 1], kv[:, 1, 0])
        checks = (
            torch.equal(key_cache.view(-1, 2, 3)[slots], kv[:, 0, 1]),
            torch.equal(value_cache.view(-1, 2, 3)[slots], kv[:, 1, 0]),
            int(key_cache.count_nonzero()) == int(kv[:, 0, 1].count_nonzero()),
            close(rms_norm(x, weight, 1e-5), reference_rms_norm(x, weight, 1e-5)),
            close(residual, x + delta),
            close(normed, reference_rms_norm(x + delta, weight, 1e-5)),
            close(silu_mul(gate_up), F.silu(gate) * up),
            close(rotated, reference_rotary(qk, positions, angles.cos(), angles.sin())),
        )
        if not all(checks):
            log.warning("fused layer ops disagree with eager torch (%s); not used", dtype)
            return False
    return True
