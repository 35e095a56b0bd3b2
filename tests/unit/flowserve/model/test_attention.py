"""Paged attention (bucketed decodes, prefill chunks) against plain float64 attention."""

from __future__ import annotations

import random

import pytest
import torch

from deepserve.flowserve.engine.step_plan import StepPlan, StepSequence
from deepserve.flowserve.model.attention import paged_attention, write_kv
from deepserve.flowserve.runner.inputs import build_model_inputs

BLOCK_SIZE = 4
NUM_BLOCKS = 1024
HEADS, KV_HEADS, HEAD_DIM = 6, 2, 8


@pytest.fixture(autouse=True)
def _single_thread() -> None:
    torch.set_num_threads(1)


def _plan(chunks: list[tuple[int, int]], seed: int = 0) -> StepPlan:
    """One sequence per (cached positions, new tokens), blocks handed out shuffled."""
    rng = random.Random(seed)
    free = list(range(NUM_BLOCKS))
    rng.shuffle(free)
    sequences = []
    for i, (start, count) in enumerate(chunks):
        blocks = [free.pop() for _ in range(-(-(start + count) // BLOCK_SIZE))]
        sequences.append(StepSequence(f"r{i}", [1] * count, start, blocks))
    return StepPlan(step_id=0, sequences=sequences)


def _reference(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int
) -> torch.Tensor:
    """Causal attention of q [n, heads, d] at positions start.. over keys/values [ctx, kv, d]."""
    group = HEADS // KV_HEADS
    k = keys.double().repeat_interleave(group, dim=1).transpose(0, 1)  # [heads, ctx, d]
    v = values.double().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = q.double().transpose(0, 1) @ k.transpose(1, 2) / HEAD_DIM**0.5
    query_pos = torch.arange(start, start + q.shape[0])[:, None]
    scores = scores.masked_fill(torch.arange(k.shape[1])[None, :] > query_pos, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1).reshape(q.shape[0], -1)


@pytest.mark.parametrize(
    "chunks",
    [
        [(0, 7)],  # fresh prefill: reads this step's keys, no gather
        [(9, 6)],  # prefill continuing a cached prompt
        [(5, 1), (5, 1), (5, 1)],  # equal decodes: one in-order bucket
        [(2, 1), (300, 1), (40, 1), (301, 1), (0, 1), (150, 1)],  # several buckets
        [(120, 1), (0, 5), (3, 1), (8, 4), (250, 1)],  # decodes around prefill chunks
    ],
)
def test_matches_plain_attention(chunks: list[tuple[int, int]]) -> None:
    torch.manual_seed(0)
    plan = _plan(chunks)
    inputs = build_model_inputs(plan, block_size=BLOCK_SIZE, device=torch.device("cpu"))
    cache_shape = (NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    key_cache, value_cache = torch.randn(cache_shape), torch.randn(cache_shape)
    tokens = inputs.token_ids.numel()
    q = torch.randn(tokens, HEADS, HEAD_DIM)
    key = torch.randn(tokens, KV_HEADS, HEAD_DIM)
    value = torch.randn(tokens, KV_HEADS, HEAD_DIM)
    meta = inputs.attention
    write_kv(key_cache, value_cache, meta.slot_mapping, key, value)

    out = paged_attention(q, key_cache, value_cache, meta, key, value)

    flat = 0
    for seq in plan.sequences:
        count = len(seq.token_ids)
        context = seq.start_pos + count
        slots = [
            seq.block_table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(context)
        ]
        keys = key_cache.view(-1, KV_HEADS, HEAD_DIM)[slots]
        values = value_cache.view(-1, KV_HEADS, HEAD_DIM)[slots]
        expected = _reference(q[flat : flat + count], keys, values, seq.start_pos)
        torch.testing.assert_close(
            out[flat : flat + count].double(), expected, atol=1e-5, rtol=1e-5
        )
        flat += count


def test_decodes_are_bucketed_by_context_length() -> None:
    lengths = [2, 900, 40, 901, 0, 450, 3]
    plan = _plan([(n, 1) for n in lengths])
    meta = build_model_inputs(plan, block_size=BLOCK_SIZE, device=torch.device("cpu")).attention
    assert len(meta.decodes) > 1
    rows = sorted(i for d in meta.decodes for i in d.token_indices.tolist())
    assert rows == list(range(len(lengths)))  # every decode in exactly one bucket
    # Each bucket is padded to its own longest context, never to the step's.
    assert sum(d.block_ids.numel() for d in meta.decodes) < len(lengths) * (902 // BLOCK_SIZE)


def test_equal_decodes_form_one_in_order_bucket() -> None:
    plan = _plan([(17, 1)] * 5)
    meta = build_model_inputs(plan, block_size=BLOCK_SIZE, device=torch.device("cpu")).attention
    assert len(meta.decodes) == 1
    assert meta.decodes[0].token_indices is None
    assert meta.decodes[0].key_mask is None
