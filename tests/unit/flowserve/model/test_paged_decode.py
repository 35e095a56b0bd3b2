"""The C++ paged decode kernel: built here, checked against plain attention and the SDPA path."""

from __future__ import annotations

import random

import pytest
import torch

from deepserve.flowserve.kernels import library
from deepserve.flowserve.kernels import paged_decode as kernel
from deepserve.flowserve.model.attention import AttentionMetadata, paged_attention, write_kv
from deepserve.flowserve.runner.inputs import build_model_inputs
from tests.unit.flowserve.model.test_attention import _plan
from tests.unit.flowserve.model.thread_counts import same_bits_at_every_thread_count


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    # This machine kind has a compiler; a build failure is a failure, not a skip.
    library.build()
    assert kernel.available(), "the built kernel did not load or disagreed with the reference"


def shuffled_block_tables(lengths: list[int], block_size: int, num_blocks: int) -> list[list[int]]:
    """Each length's blocks, handed out in shuffled order from [0, num_blocks); rows padded to
    the longest with their own first block (a valid id the kernels must not read)."""
    rng = random.Random(len(lengths))
    free = list(range(num_blocks))
    rng.shuffle(free)
    max_blocks = max(-(-n // block_size) for n in lengths)
    tables = []
    for n in lengths:
        own = [free.pop() for _ in range(-(-n // block_size))]
        tables.append(own + [own[0]] * (max_blocks - len(own)))
    return tables


def written_step(meta: AttentionMetadata, dim: int) -> tuple[torch.Tensor, ...]:
    """Random q [tokens, 6, dim] and this step's keys and values [tokens, 2, dim], written into
    fresh random caches (block size 4) at the metadata's slots: (q, key_cache, value_cache, key,
    value), as the model has them when it attends."""
    torch.manual_seed(0)
    cache_shape = (1024, 4, 2, dim)
    key_cache, value_cache = torch.randn(cache_shape), torch.randn(cache_shape)
    tokens = meta.slot_mapping.numel()
    q = torch.randn(tokens, 6, dim)
    key, value = torch.randn(tokens, 2, dim), torch.randn(tokens, 2, dim)
    write_kv(key_cache, value_cache, meta.slot_mapping, key, value)
    return q, key_cache, value_cache, key, value


def _problem(
    lengths: list[int],
    dtype: torch.dtype,
    *,
    heads: int = 9,
    kv_heads: int = 3,
    dim: int = 64,
    block_size: int = 16,
) -> tuple[torch.Tensor, ...]:
    """Caches with blocks handed out shuffled; q a strided view like the model's qk split."""
    num_blocks = 64 * 16 // block_size
    tables = shuffled_block_tables(lengths, block_size, num_blocks)
    generator = torch.Generator().manual_seed(1)
    shape = (num_blocks, block_size, kv_heads, dim)
    key_cache = torch.randn(shape, generator=generator).to(dtype)
    value_cache = torch.randn(shape, generator=generator).to(dtype)
    qk = torch.randn(len(lengths), heads + kv_heads, dim, generator=generator).to(dtype)
    return (
        qk[:, :heads],
        key_cache,
        value_cache,
        torch.tensor(tables, dtype=torch.long),
        torch.tensor(lengths, dtype=torch.long),
    )


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("lengths", [[1], [16, 17, 5, 300], [33] * 4, [200, 1, 64]])
def test_matches_plain_attention(lengths: list[int], dtype: torch.dtype, tolerance: float) -> None:
    problem = _problem(lengths, dtype)
    got = kernel.paged_decode(*problem, 0.125)
    want = kernel.reference_decode(*problem, 0.125)
    assert got.dtype == dtype and got.shape == (len(lengths), 9, 64)
    torch.testing.assert_close(got.float(), want.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"),
    # GQA groups of 1-7 heads, split into register passes of 4 (64 dims) or 2 (128 dims), and a
    # head size without a vector path.
    [(5, 5, 64), (8, 2, 64), (14, 2, 64), (32, 8, 128), (10, 2, 128), (6, 2, 32)],
)
def test_every_group_shape_matches_plain_attention(
    heads: int, kv_heads: int, dim: int, dtype: torch.dtype
) -> None:
    problem = _problem([16, 17, 5, 300], dtype, heads=heads, kv_heads=kv_heads, dim=dim)
    got = kernel.paged_decode(*problem, dim**-0.5)
    want = kernel.reference_decode(*problem, dim**-0.5)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block_size"),
    # Blocks of whole 16-row tiles (bfloat16's AMX path on hosts that have it) and of fewer rows
    # (the vector path); groups of 1-5 heads in 64 and 128 dims.
    [(9, 3, 64, 32), (10, 2, 64, 16), (4, 4, 128, 16), (6, 2, 128, 48), (9, 3, 64, 8)],
)
def test_bfloat16_block_sizes_match_plain_attention(
    heads: int, kv_heads: int, dim: int, block_size: int
) -> None:
    problem = _problem(
        [1, 15, 16, 33, 300],
        torch.bfloat16,
        heads=heads,
        kv_heads=kv_heads,
        dim=dim,
        block_size=block_size,
    )
    got = kernel.paged_decode(*problem, dim**-0.5)
    want = kernel.reference_decode(*problem, dim**-0.5)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "lengths",
    # Few sequences (split by kv head) and many (a sequence's heads a turn), of mixed lengths.
    [[300], [40, 7], [16, 17, 5, 300, 1, 64, 33, 120, 2, 250]],
)
def test_threads_taking_sequences_as_they_free_up_give_the_same_bits(
    lengths: list[int], dtype: torch.dtype
) -> None:
    problem = _problem(lengths, dtype)
    same_bits_at_every_thread_count(kernel.paged_decode, *problem, 0.125)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ignores_blocks_past_each_length(dtype: torch.dtype) -> None:
    # Lengths that end mid-tile and on an odd row: bfloat16's AMX path reads the rest of a
    # 16-row tile and pairs value rows, and must drop what lies past the length.
    query, key_cache, value_cache, tables, lens = _problem([20, 3], dtype)
    before = kernel.paged_decode(query, key_cache, value_cache, tables, lens, 0.125)
    # Poison every slot past each sequence's length: the output must not move.
    for seq, length in enumerate(lens.tolist()):
        for pos in range(length, tables.shape[1] * 16):
            block = tables[seq, pos // 16]
            if pos // 16 >= -(-length // 16) and block == tables[seq, 0]:
                continue  # the padding id repeats the first block, whose keys are real
            key_cache[block, pos % 16] = 1e4
            value_cache[block, pos % 16] = float("nan")
    after = kernel.paged_decode(query, key_cache, value_cache, tables, lens, 0.125)
    torch.testing.assert_close(after, before)


def test_rejects_mismatched_inputs() -> None:
    query, key_cache, value_cache, tables, lens = _problem([4, 4], torch.float32)
    with pytest.raises(RuntimeError, match="share a dtype"):
        kernel.paged_decode(query.double(), key_cache, value_cache, tables, lens, 0.1)
    with pytest.raises(RuntimeError, match="block_tables"):
        kernel.paged_decode(query, key_cache, value_cache, tables.int(), lens, 0.1)
    with pytest.raises(RuntimeError, match="context_lens"):
        kernel.paged_decode(query, key_cache, value_cache, tables, lens[:1], 0.1)


@pytest.mark.parametrize(
    "chunks",
    [
        [(5, 1), (5, 1), (5, 1)],
        [(2, 1), (300, 1), (40, 1), (301, 1), (0, 1), (150, 1)],
        [(120, 1), (0, 5), (3, 1), (8, 4), (250, 1)],  # decodes around prefill chunks
    ],
)
def test_fused_step_matches_the_sdpa_path(chunks: list[tuple[int, int]]) -> None:
    """The same step through the model's attention, fused metadata against bucketed."""
    plan = _plan(chunks)
    cpu = torch.device("cpu")
    fused = build_model_inputs(plan, block_size=4, device=cpu, fused_decode=True).attention
    bucketed = build_model_inputs(plan, block_size=4, device=cpu).attention
    assert len(fused.decodes) == 1 and all(d.key_mask is None for d in fused.decodes)
    q, key_cache, value_cache, key, value = written_step(fused, dim=8)
    got = paged_attention(q, key_cache, value_cache, fused, key, value, fused_decode=True)
    want = paged_attention(q, key_cache, value_cache, bucketed, key, value)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (14, 2, 64), (32, 8, 128)])
def test_whole_sequences_by_whole_rows_give_the_per_head_bits(
    heads: int, kv_heads: int, dim: int, dtype: torch.dtype
) -> None:
    # Four or more sequences go a sequence at a time, reading whole token rows; one sequence
    # alone goes a kv head at a time. Each score and sum is made in the same order either way.
    lengths = [16, 17, 5, 300, 1, 64]
    q, key_cache, value_cache, tables, lens = _problem(
        lengths, dtype, heads=heads, kv_heads=kv_heads, dim=dim
    )
    together = kernel.paged_decode(q, key_cache, value_cache, tables, lens, dim**-0.5)
    for i in range(len(lengths)):
        alone = kernel.paged_decode(
            q[i : i + 1], key_cache, value_cache, tables[i : i + 1], lens[i : i + 1], dim**-0.5
        )
        assert torch.equal(together[i : i + 1], alone), f"sequence {i}"
