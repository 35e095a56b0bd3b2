"""Attention over a paged KV cache for a flat batch of tokens from many sequences.

Sequences with one new token (decode, or a one-token prefill chunk) are attended together: their
KV blocks are gathered in one index_select into a padded [seqs, max_len] view and a key mask hides
the padding, so a decode step costs a handful of kernel calls per layer whatever the batch size.
Longer prefill chunks run one scaled_dot_product_attention each, with the causal mask offset by
the number of already-cached positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class DecodeGroup:
    """Sequences that contribute exactly one query token this step."""

    # Flat token index of each sequence's token; None when the group is the whole batch in order.
    token_indices: torch.Tensor | None
    block_ids: torch.Tensor  # [seqs, max_blocks] long, padded with any valid block id
    max_context_len: int
    # [seqs, 1, 1, max_context_len] bool, True where a key is real; None when no padding.
    key_mask: torch.Tensor | None
    # Gathered K and V of the group, made by the first layer and refilled by the others: a
    # fresh multi-MB tensor per layer costs page faults that rival the gather itself on CPU.
    gather_buffers: tuple[torch.Tensor, torch.Tensor] | None = None


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
class AttentionMetadata:
    """Where each token's KV goes and which cached KV each query reads; shared by all layers."""

    slot_mapping: torch.Tensor  # [tokens] long: block * block_size + offset
    decode: DecodeGroup | None = None
    prefills: list[PrefillChunk] = field(default_factory=list)


def write_kv(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slots: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
) -> None:
    """Store key/value [tokens, kv_heads, head_dim] at flat slots of one layer's paged cache."""
    _, _, kv_heads, head_dim = key_cache.shape
    key_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, key)
    value_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, value)


def paged_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """Attend q [tokens, heads, head_dim] over cached KV; returns [tokens, heads * head_dim].

    key_cache/value_cache are one layer's [num_blocks, block_size, kv_heads, head_dim] tensors that
    already hold this step's new keys and values.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    decode = meta.decode
    if decode is not None and decode.token_indices is None and not meta.prefills:
        return _decode_attention(q, key_cache, value_cache, decode, group)

    out = q.new_empty(num_tokens, num_heads * head_dim)
    if decode is not None:
        assert decode.token_indices is not None
        q_decode = q.index_select(0, decode.token_indices)
        out.index_copy_(
            0,
            decode.token_indices,
            _decode_attention(q_decode, key_cache, value_cache, decode, group),
        )
    for chunk in meta.prefills:
        q_chunk = q[chunk.token_start : chunk.token_end].transpose(0, 1)  # [heads, n, d]
        k = _gather(key_cache, chunk.block_ids, chunk.context_len).transpose(0, 1)
        v = _gather(value_cache, chunk.block_ids, chunk.context_len).transpose(0, 1)
        o = F.scaled_dot_product_attention(
            q_chunk,
            k,
            v,
            attn_mask=chunk.mask,
            is_causal=chunk.mask is None,
            enable_gqa=group > 1,
        )
        out[chunk.token_start : chunk.token_end] = o.transpose(0, 1).reshape(
            -1, num_heads * head_dim
        )
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
    group: int,
) -> torch.Tensor:
    seqs, num_heads, head_dim = q.shape
    num_blocks, block_size, kv_heads, _ = key_cache.shape
    max_blocks = decode.block_ids.shape[1]
    flat_ids = decode.block_ids.reshape(-1)
    length = decode.max_context_len
    if decode.gather_buffers is None:
        shape = (flat_ids.numel(), block_size * kv_heads * head_dim)
        decode.gather_buffers = (key_cache.new_empty(shape), value_cache.new_empty(shape))
    key_buffer, value_buffer = decode.gather_buffers
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
