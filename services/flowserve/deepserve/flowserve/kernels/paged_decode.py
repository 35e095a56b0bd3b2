"""Decode attention straight from the paged KV cache (`paged_decode.cpp`), for CPU.

One query token per sequence. The pure-torch path (`model/attention._decode_attention`) gathers
every sequence's blocks into a buffer and SDPA reads them again, so the cached keys and values
cross memory three times; at 32 sequences that was 39% of a decode step (bench/RESULTS.md,
issue #19). The kernel reads each cached row once for all query heads of its GQA group.
"""

from __future__ import annotations

import logging

import torch

from deepserve.flowserve.kernels import library

log = logging.getLogger(__name__)

# "0" keeps the gather + SDPA decode path even where the kernel is built.
KERNEL_ENV = "DEEPSERVE_FLOWSERVE_PAGED_DECODE_KERNEL"


def available() -> bool:
    """The kernel is built, loaded, switched on, and agrees with the plain computation."""
    return library.op_usable(KERNEL_ENV, _agrees)


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
    # Head size 8 takes the generic path; 64 the vector path, a GQA group of 5 in two passes;
    # blocks of 16 rows, bfloat16's AMX path where the host has it.
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        for heads, kv_heads, dim, block_size in ((6, 2, 8, 4), (10, 2, 64, 4), (10, 2, 64, 16)):
            shape = (6, block_size, kv_heads, dim)
            key_cache = torch.randn(shape, generator=generator).to(dtype)
            value_cache = torch.randn(shape, generator=generator).to(dtype)
            query = torch.randn(3, heads, dim, generator=generator).to(dtype)
            tables = torch.tensor([[5, 1, 2], [0, 0, 0], [3, 4, 0]])
            lens = torch.tensor([11, 1, 6])
            got = paged_decode(query, key_cache, value_cache, tables, lens, 0.35)
            want = reference_decode(query, key_cache, value_cache, tables, lens, 0.35)
            if not torch.allclose(got.float(), want.float(), atol=tolerance, rtol=tolerance):
                log.warning("paged decode kernel disagrees with the reference; not used")
                return False
    return True
