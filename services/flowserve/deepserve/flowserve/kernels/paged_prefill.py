"""Causal attention of a step's prefill chunks straight from the paged KV cache
(`paged_prefill.cpp`), for CPU.

The pure-torch path runs one scaled_dot_product_attention per chunk (gathering the cached blocks
and building a mask when the chunk continues a cached prefix); SDPA's flash kernel ran float32 at
a fraction of the machine's FMA rate and was a quarter of a 1024-token float32 prefill step
(bench/RESULTS.md, issue #19). The kernel serves every chunk of a step in one call per layer.
"""

from __future__ import annotations

import logging

import torch

from deepserve.flowserve.kernels import library

log = logging.getLogger(__name__)

# "0" keeps one scaled_dot_product_attention per chunk.
KERNEL_ENV = "DEEPSERVE_FLOWSERVE_PAGED_PREFILL_KERNEL"
HEAD_SIZES = (64, 128)


def available() -> bool:
    """The kernel is built for this CPU, loaded, switched on, and agrees with the reference."""
    return library.op_usable(KERNEL_ENV, _agrees)


def serves(dtype: torch.dtype) -> bool:
    """The kernel is available and beats SDPA's flash kernel in `dtype`: float32 always;
    bfloat16 on AMX tiles, and on CPUs without AMX. Where only SDPA has AMX, SDPA: the vector
    path ran it 1.1-2.2x slower than SDPA's AMX kernel, but without AMX in 0.5-0.63x SDPA's
    time (a 1024-token step's attention, 93 against 147-181 ms, Zen 4 EPYC)."""
    if dtype == torch.float32:
        return available()
    if dtype == torch.bfloat16:
        if not available():
            return False
        return bool(torch.ops.deepserve_flowserve.amx_tiles()) or not library.cpu_has("amx_bf16")
    return False


def paged_prefill(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_starts: torch.Tensor,
    query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> None:
    """Attend each chunk's queries causally over its cached keys; write their rows of `out`.

    query [tokens, heads, dim]; caches [blocks, block_size, kv_heads, dim] holding every chunk's
    keys and values, its own included; block_tables [chunks, max_blocks]; chunk c is queries
    [query_starts[c], + query_lens[c]) at positions [context_lens[c] - query_lens[c],
    context_lens[c]); out [tokens, heads * dim].
    """
    torch.ops.deepserve_flowserve.paged_prefill(
        query,
        key_cache,
        value_cache,
        block_tables,
        query_starts,
        query_lens,
        context_lens,
        scale,
        out,
    )


def reference_prefill(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_starts: torch.Tensor,
    query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> None:
    """The same attention written plainly, one chunk at a time, in float32."""
    _, heads, dim = query.shape
    _, block_size, kv_heads, _ = key_cache.shape
    for c in range(block_tables.shape[0]):
        start, n, length = int(query_starts[c]), int(query_lens[c]), int(context_lens[c])
        blocks = block_tables[c, : -(-length // block_size)]
        k = key_cache[blocks].reshape(-1, kv_heads, dim)[:length].float()
        v = value_cache[blocks].reshape(-1, kv_heads, dim)[:length].float()
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        q = query[start : start + n].float()
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        positions = torch.arange(length - n, length)[:, None]
        scores.masked_fill_(torch.arange(length)[None, :] > positions, float("-inf"))
        o = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
        out[start : start + n] = o.reshape(n, heads * dim).to(out.dtype)


def _agrees() -> bool:
    """The kernel matches the reference on ragged chunks (a fresh prompt, one continuing a
    cached prefix, one shorter than a tile) with GQA, both head sizes and dtypes."""
    generator = torch.Generator().manual_seed(0)
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        for heads, kv_heads, dim in ((6, 2, 64), (4, 2, 128)):
            cache_shape = (12, 8, kv_heads, dim)
            key_cache = torch.randn(cache_shape, generator=generator).to(dtype)
            value_cache = torch.randn(cache_shape, generator=generator).to(dtype)
            query = torch.randn(60, heads, dim, generator=generator).to(dtype)
            tables = torch.tensor([[3, 7, 1, 0, 0, 0], [2, 5, 9, 11, 4, 6], [8, 10, 0, 0, 0, 0]])
            starts, lens = torch.tensor([0, 21, 55]), torch.tensor([21, 34, 5])
            contexts = torch.tensor([21, 47, 12])
            args = (query, key_cache, value_cache, tables, starts, lens, contexts, 0.3)
            got = torch.zeros(60, heads * dim, dtype=dtype)
            want = torch.zeros(60, heads * dim, dtype=dtype)
            try:
                paged_prefill(*args, got)
            except (RuntimeError, AttributeError) as exc:
                log.info("paged prefill kernel unavailable: %s", exc)
                return False
            reference_prefill(*args, want)
            if not torch.allclose(got.float(), want.float(), atol=tolerance, rtol=tolerance):
                log.warning("paged prefill kernel disagrees with the reference; not used")
                return False
    return True
