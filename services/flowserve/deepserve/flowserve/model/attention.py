"""Attention over a paged KV cache for one step's flat run of tokens from many sequences.

Sequences with one new token (decode, or a one-token prefill chunk) are attended by the C++
kernel of `deepserve.flowserve.kernels.paged_decode` where it is built (one call per layer, reading the cache in
place). Otherwise they are attended in buckets of similar context length: each bucket's KV blocks are gathered in one index_select into a padded
[seqs, bucket_len] view and a key mask hides the padding. Bucketing keeps that padding (which
is gathered and read again like real keys) small when short and long contexts decode together,
at the price of a few kernel calls per bucket and layer.

Longer prefill chunks go to the C++ kernel of `deepserve.flowserve.kernels.paged_prefill` where the
model uses it (all chunks of the step in one call per layer, read from the cache in place).
Otherwise they run one scaled_dot_product_attention each. A chunk that starts a sequence
attends to the keys and values computed this step, with no gather; a chunk continuing a cached
prompt gathers its blocks and uses a causal mask offset by the cached length. All calls pass 4-D
tensors: CPU SDPA only takes its fused (flash) kernel, GQA included, for 4-D inputs and would
otherwise fall back to the unfused math path, several times slower for long chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from deepserve.flowserve.kernels import fused_layer_ops
from deepserve.flowserve.kernels.paged_decode import paged_decode
from deepserve.flowserve.kernels.paged_prefill import paged_prefill


@dataclass(slots=True)
class DecodeGroup:
    """A bucket of sequences that contribute exactly one query token this step."""

    # Flat token index of each sequence's token; None when the group is the whole step in order.
    token_indices: torch.Tensor | None
    block_ids: torch.Tensor  # [seqs, max_blocks] long, padded with any valid block id
    max_context_len: int
    # [seqs, 1, 1, max_context_len] bool, True where a key is real; None when no padding (or
    # when the fused kernel, which reads each sequence's own length, attends the group).
    key_mask: torch.Tensor | None
    context_lens: torch.Tensor  # [seqs] long: keys each sequence attends, its token included


@dataclass(slots=True)
class PrefillChunk:
    """One sequence's multi-token chunk: queries at positions [start, start + n)."""

    token_start: int  # first flat token index of the chunk
    token_end: int
    block_ids: torch.Tensor  # [blocks covering start + n] long
    context_len: int  # start + n
    # [n, context_len] bool (query i sees keys <= start + i); None means plain causal, start == 0.
    mask: torch.Tensor | None


@dataclass(slots=True)
class PrefillBatch:
    """Every multi-token chunk of the step, for the C++ prefill kernel (one call per layer)."""

    block_tables: torch.Tensor  # [chunks, max_blocks] long, padded with a valid block id
    query_starts: torch.Tensor  # [chunks] long: flat index of each chunk's first token
    query_lens: torch.Tensor  # [chunks] long
    context_lens: torch.Tensor  # [chunks] long: start + n


@dataclass(slots=True)
class AttentionMetadata:
    """Where each token's KV goes and which cached KV each query reads; shared by all layers."""

    slot_mapping: torch.Tensor  # [tokens] long: block * block_size + offset
    decodes: list[DecodeGroup] = field(default_factory=list)
    prefills: list[PrefillChunk] = field(default_factory=list)
    # Set instead of `prefills` when the model attends prefill chunks with the C++ kernel.
    prefill_batch: PrefillBatch | None = None
    # Gathered K and V of the largest decode bucket, made by the first layer and refilled by
    # every bucket of every layer: a fresh multi-MB tensor each time costs page faults that
    # rival the gather itself on CPU, and a reused one stays in cache.
    gather_buffers: tuple[torch.Tensor, torch.Tensor] | None = None


def write_kv(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slots: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
) -> None:
    """Store key/value [tokens, kv_heads, head_dim] at flat slots of one layer's paged cache."""
    _, _, kv_heads, head_dim = key_cache.shape
    if (
        key_cache.device.type == "cpu"
        and key_cache.is_contiguous()
        and value_cache.is_contiguous()
        and all(t.stride(-1) == 1 and t.stride(-2) == head_dim for t in (key, value))
        and fused_layer_ops.available()
    ):
        # One memcpy per token where index_copy_ walks the strided slices element by element.
        fused_layer_ops.write_kv_(key_cache, value_cache, slots, key, value)
        return
    key_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, key)
    value_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, value)


def paged_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    key: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
    *,
    fused_decode: bool = False,
) -> torch.Tensor:
    """Attend q [tokens, heads, head_dim] over cached KV; returns [tokens, heads * head_dim].

    key_cache/value_cache are one layer's [num_blocks, block_size, kv_heads, head_dim] tensors that
    already hold this step's new keys and values. `key`/`value` [tokens, kv_heads, head_dim] are
    those new keys and values: chunks that start a sequence read them instead of the cache.
    `fused_decode` attends decodes with the C++ kernel (the metadata was built for it).
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    decodes = meta.decodes

    def decode(q_decode: torch.Tensor, group_meta: DecodeGroup) -> torch.Tensor:
        if fused_decode:
            out = paged_decode(
                q_decode,
                key_cache,
                value_cache,
                group_meta.block_ids,
                group_meta.context_lens,
                head_dim**-0.5,
            )
            return out.view(-1, num_heads * head_dim)
        return _decode_attention(q_decode, key_cache, value_cache, group_meta, meta, group)

    if len(decodes) == 1 and decodes[0].token_indices is None:
        return decode(q, decodes[0])

    out = q.new_empty(num_tokens, num_heads * head_dim)
    for decode_group in decodes:
        assert decode_group.token_indices is not None
        q_decode = q.index_select(0, decode_group.token_indices)
        out.index_copy_(
            0,
            decode_group.token_indices,
            decode(q_decode, decode_group),
        )
    if meta.prefill_batch is not None:
        batch = meta.prefill_batch
        paged_prefill(
            q,
            key_cache,
            value_cache,
            batch.block_tables,
            batch.query_starts,
            batch.query_lens,
            batch.context_lens,
            head_dim**-0.5,
            out,
        )
    for chunk in meta.prefills:
        span = slice(chunk.token_start, chunk.token_end)
        if chunk.mask is None and key is not None and value is not None:
            k, v = key[span], value[span]
        else:
            k = _gather(key_cache, chunk.block_ids, chunk.context_len)
            v = _gather(value_cache, chunk.block_ids, chunk.context_len)
        # [1, heads, n, d]: the batch axis is what selects the fused kernel (see module doc).
        o = F.scaled_dot_product_attention(
            q[span].transpose(0, 1).unsqueeze(0),
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            attn_mask=chunk.mask,
            is_causal=chunk.mask is None,
            enable_gqa=group > 1,
        )
        out[span] = o[0].transpose(0, 1).reshape(-1, num_heads * head_dim)
    return out


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, length: int) -> torch.Tensor:
    """[length, kv_heads, head_dim] keys (or values) of one sequence, gathered block by block."""
    _, _, kv_heads, head_dim = cache.shape
    blocks = cache.index_select(0, block_ids)
    return blocks.view(-1, kv_heads, head_dim)[:length]


def _decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    decode: DecodeGroup,
    meta: AttentionMetadata,
    group: int,
) -> torch.Tensor:
    seqs, num_heads, head_dim = q.shape
    num_blocks, block_size, kv_heads, _ = key_cache.shape
    max_blocks = decode.block_ids.shape[1]
    flat_ids = decode.block_ids.reshape(-1)
    rows = flat_ids.numel()
    length = decode.max_context_len
    if meta.gather_buffers is None:
        most_rows = max(d.block_ids.numel() for d in meta.decodes)
        shape = (most_rows, block_size * kv_heads * head_dim)
        meta.gather_buffers = (key_cache.new_empty(shape), value_cache.new_empty(shape))
    key_buffer, value_buffer = (buffer[:rows] for buffer in meta.gather_buffers)
    torch.index_select(key_cache.view(num_blocks, -1), 0, flat_ids, out=key_buffer)
    torch.index_select(value_cache.view(num_blocks, -1), 0, flat_ids, out=value_buffer)
    # [seqs, kv_heads, len, d]; padding beyond each sequence's length is masked out.
    k = key_buffer.view(seqs, max_blocks * block_size, kv_heads, head_dim)
    v = value_buffer.view(seqs, max_blocks * block_size, kv_heads, head_dim)
    k = k[:, :length].transpose(1, 2)
    v = v[:, :length].transpose(1, 2)
    # One query token per sequence: fold the heads sharing a kv head into the query axis, so GQA
    # needs no repeat of K/V and the key mask broadcasts over that axis.
    q_grouped = q.view(seqs, kv_heads, group, head_dim)
    o = F.scaled_dot_product_attention(q_grouped, k, v, attn_mask=decode.key_mask)
    return o.reshape(seqs, num_heads * head_dim)
