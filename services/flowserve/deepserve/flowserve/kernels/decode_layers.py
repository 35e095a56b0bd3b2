"""Every decoder layer of a decode step in one native call (`decode_layers.cpp`), for CPU.

The layer's kernels are the ones the Python layer loop calls one by one (fused_layer_ops,
skinny_linear, paged_decode); chained in C++ they cost one crossing from Python per step instead
of ~10 a layer, and the interpreter's lock is free meanwhile. The results are the same bits.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from deepserve.flowserve.kernels import fused_layer_ops, library, paged_decode, skinny_linear

log = logging.getLogger(__name__)

# "0" keeps the Python layer loop for decode steps.
KERNEL_ENV = "DEEPSERVE_FLOWSERVE_DECODE_LAYERS"


def available(dtype: torch.dtype) -> bool:
    """The op is built, loaded, switched on, its parts serve `dtype`, and it matches them."""
    return (
        fused_layer_ops.available()
        and paged_decode.available()
        and skinny_linear.available(dtype)
        and library.op_usable(KERNEL_ENV, _agrees)
    )


@dataclass(frozen=True, slots=True)
class LayerStack:
    """A model's decoder layers as the op takes them, gathered once."""

    # Per layer: input_norm, qkv, o, gate_up and down panels (skinny_linear.pack), post_norm.
    weights: list[torch.Tensor]
    biases: list[torch.Tensor | None]  # per layer: qkv, o, gate_up, down
    heads: int
    kv_heads: int
    intermediate: int
    eps: float
    scale: float


@dataclass(frozen=True, slots=True)
class DecodeInputs:
    """One decode step's per-token inputs, shared by every layer."""

    positions: torch.Tensor  # [rows] int64
    slots: torch.Tensor  # [rows] int64: where each token's keys and values go
    block_tables: torch.Tensor  # [rows, max_blocks] int64, as paged_decode takes them
    context_lens: torch.Tensor  # [rows] int64, the new token included
    cos: torch.Tensor  # rotary tables, float32 [positions, head_dim / 2]
    sin: torch.Tensor


def layer_entries(
    input_norm: torch.Tensor,
    panels: Sequence[torch.Tensor],
    post_norm: torch.Tensor,
) -> list[torch.Tensor]:
    """One layer's `weights` entries from its norms and its qkv, o, gate_up, down panels."""
    qkv, o, gate_up, down = panels
    return [input_norm, qkv, o, post_norm, gate_up, down]


def decode_layers(
    residual: torch.Tensor,
    stack: LayerStack,
    kv_caches: list[torch.Tensor],
    step: DecodeInputs,
) -> torch.Tensor:
    """Run every layer over residual [rows, hidden] (one token per sequence; added to in place),
    writing each layer's keys and values into `kv_caches` (per layer: key cache, value cache);
    returns the last layer's hidden states."""
    return torch.ops.deepserve_flowserve.decode_layers(
        residual,
        stack.weights,
        stack.biases,
        kv_caches,
        step.positions,
        step.slots,
        step.block_tables,
        step.context_lens,
        step.cos,
        step.sin,
        stack.heads,
        stack.kv_heads,
        stack.intermediate,
        stack.eps,
        stack.scale,
    )


def _layer_by_layer(
    residual: torch.Tensor,
    stack: LayerStack,
    kv_caches: list[torch.Tensor],
    step: DecodeInputs,
) -> torch.Tensor:
    """The same kernels called one at a time from Python: what the op must equal bit for bit."""
    ops = torch.ops.deepserve_flowserve
    rows, head_dim = residual.shape[0], kv_caches[0].shape[3]
    heads, kv_heads = stack.heads, stack.kv_heads
    q_size, kv_size, hidden = heads * head_dim, kv_heads * head_dim, residual.shape[1]
    pending = None
    for layer in range(len(kv_caches) // 2):
        norm, qkv_w, o_w, post, gate_up_w, down_w = stack.weights[6 * layer : 6 * layer + 6]
        qkv_b, o_b, gate_up_b, down_b = stack.biases[4 * layer : 4 * layer + 4]
        key_cache, value_cache = kv_caches[2 * layer : 2 * layer + 2]
        x = (
            ops.rms_norm(residual, norm, stack.eps)
            if pending is None
            else ops.add_rms_norm(residual, pending, norm, stack.eps)
        )
        qkv = ops.skinny_linear(x, qkv_w, q_size + 2 * kv_size, qkv_b)
        qk = qkv[:, : q_size + kv_size].view(rows, heads + kv_heads, head_dim)
        ops.rotary_(qk, step.positions, step.cos, step.sin)
        value = qkv[:, q_size + kv_size :].view(rows, kv_heads, head_dim)
        ops.write_kv_(key_cache, value_cache, step.slots, qk[:, heads:], value)
        attn = ops.paged_decode(
            qk[:, :heads], key_cache, value_cache, step.block_tables, step.context_lens, stack.scale
        )
        x = ops.add_rms_norm(
            residual, ops.skinny_linear(attn.view(rows, -1), o_w, hidden, o_b), post, stack.eps
        )
        act = ops.silu_mul(ops.skinny_linear(x, gate_up_w, 2 * stack.intermediate, gate_up_b))
        pending = ops.skinny_linear(act, down_w, hidden, down_b)
    assert pending is not None
    return residual + pending


def _probe_problem(
    dtype: torch.dtype, rows: int
) -> tuple[torch.Tensor, LayerStack, list[torch.Tensor], DecodeInputs]:
    """Two small random layers (GQA, biases on some projections), caches with some history."""
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.3).to(dtype)

    hidden, heads, kv_heads, head_dim, inter, blocks, block_size = 64, 4, 2, 16, 96, 12, 4
    weights: list[torch.Tensor] = []
    biases: list[torch.Tensor | None] = []
    kv_caches: list[torch.Tensor] = []
    for layer in range(2):
        shapes = ((heads + 2 * kv_heads) * head_dim, hidden), (hidden, heads * head_dim)
        shapes += ((2 * inter, hidden), (hidden, inter))
        panels = [skinny_linear.pack(rand(*shape)) for shape in shapes]
        weights += layer_entries(rand(hidden) + 1, panels, rand(hidden) + 1)
        biases += [rand(shapes[0][0]), None, rand(2 * inter) if layer else None, rand(hidden)]
        kv_caches += [rand(blocks, block_size, kv_heads, head_dim) for _ in range(2)]
    stack = LayerStack(weights, biases, heads, kv_heads, inter, 1e-5, head_dim**-0.5)
    context_lens = torch.arange(rows, dtype=torch.long) * 3 + 2
    block_tables = torch.randperm(blocks, generator=generator)[: rows * 3].view(rows, 3)
    last = context_lens - 1
    slots = block_tables.gather(1, (last // block_size).view(-1, 1)).view(-1) * block_size
    slots = slots + last % block_size
    half = head_dim // 2
    angles = torch.arange(16, dtype=torch.float32).view(-1, 1) * torch.rand(
        half, generator=generator
    )
    step = DecodeInputs(last, slots, block_tables, context_lens, angles.cos(), angles.sin())
    return rand(rows, hidden), stack, kv_caches, step


def _agrees() -> bool:
    """Bit-equal to the same kernels called one by one, and it leaves the same caches, in each
    dtype the skinny kernel serves."""
    for dtype in (torch.float32, torch.bfloat16):
        if not skinny_linear.available(dtype):
            continue
        for rows in (1, 3):
            residual, stack, caches, step = _probe_problem(dtype, rows)
            twin_caches = [cache.clone() for cache in caches]
            try:
                got = decode_layers(residual.clone(), stack, caches, step)
            except RuntimeError as exc:
                log.warning("decode_layers kernel failed its probe (%s): %s", dtype, exc)
                return False
            want = _layer_by_layer(residual.clone(), stack, twin_caches, step)
            same_caches = all(map(torch.equal, caches, twin_caches))
            if not (torch.equal(got, want) and same_caches):
                log.warning("decode_layers kernel disagrees with its parts (%s); not used", dtype)
                return False
    return True
