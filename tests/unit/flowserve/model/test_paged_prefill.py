"""The C++ paged prefill kernel: built here, checked against plain causal attention."""

from __future__ import annotations

import pytest
import torch

from deepserve.flowserve.kernels import library
from deepserve.flowserve.kernels import paged_prefill as kernel
from deepserve.flowserve.model.attention import paged_attention
from deepserve.flowserve.runner.inputs import build_model_inputs
from tests.unit.flowserve.model.test_attention import _plan
from tests.unit.flowserve.model.test_paged_decode import shuffled_block_tables, written_step


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    # This machine kind has a compiler and AVX-512 or AVX2; a build failure is a failure, not a skip.
    library.build()
    assert kernel.available(), "the built kernel did not load or disagreed with the reference"


def _problem(
    chunks: list[tuple[int, int]],
    dtype: torch.dtype,
    *,
    heads: int = 9,
    kv_heads: int = 3,
    dim: int = 64,
    block_size: int = 16,
) -> tuple[torch.Tensor, ...]:
    """chunks: (cached tokens before the chunk, chunk tokens). Blocks handed out shuffled; the
    chunks' queries laid out one after another with a decode-like token between each two; q
    is a strided view like the model's split of its fused qk projection."""
    contexts = [cached + n for cached, n in chunks]
    num_blocks = sum(-(-c // block_size) for c in contexts) + 4
    tables = shuffled_block_tables(contexts, block_size, num_blocks)
    starts, position = [], 0
    for _, n in chunks:
        starts.append(position)
        position += n + 1  # a token of another sequence between chunks
    generator = torch.Generator().manual_seed(1)
    shape = (num_blocks, block_size, kv_heads, dim)
    key_cache = torch.randn(shape, generator=generator).to(dtype)
    value_cache = torch.randn(shape, generator=generator).to(dtype)
    qk = torch.randn(position, heads + kv_heads, dim, generator=generator).to(dtype)
    return (
        qk[:, :heads],
        key_cache,
        value_cache,
        torch.tensor(tables, dtype=torch.long),
        torch.tensor(starts, dtype=torch.long),
        torch.tensor([n for _, n in chunks], dtype=torch.long),
        torch.tensor(contexts, dtype=torch.long),
    )


def _run(fn, problem: tuple[torch.Tensor, ...], scale: float) -> torch.Tensor:  # type: ignore[no-untyped-def]
    query = problem[0]
    out = torch.full((query.shape[0], query.shape[1] * query.shape[2]), 7.0, dtype=query.dtype)
    fn(*problem, scale, out)
    return out


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize(
    "chunks",
    [
        [(0, 2)],  # shorter than a tile
        [(0, 300)],  # a fresh prompt over many tiles and panels
        [(45, 17), (0, 64), (200, 3)],  # chunks continuing cached prefixes, one of 3 tokens
        [(31, 33), (32, 32), (0, 1 + 16 * 3)],  # panel and tile edges
    ],
)
def test_matches_plain_causal_attention(
    chunks: list[tuple[int, int]], dtype: torch.dtype, tolerance: float
) -> None:
    problem = _problem(chunks, dtype)
    got = _run(kernel.paged_prefill, problem, 0.125)
    want = _run(kernel.reference_prefill, problem, 0.125)
    torch.testing.assert_close(got.float(), want.float(), atol=tolerance, rtol=tolerance)
    # The rows between chunks belong to other sequences: untouched.
    between = torch.ones(got.shape[0], dtype=torch.bool)
    for start, n in zip(problem[4].tolist(), problem[5].tolist(), strict=True):
        between[start : start + n] = False
    assert bool((got[between] == 7.0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"),
    [(5, 5, 64), (8, 2, 64), (14, 2, 64), (32, 8, 128), (10, 2, 128)],
)
def test_every_group_shape_matches_plain_causal_attention(
    heads: int, kv_heads: int, dim: int, dtype: torch.dtype
) -> None:
    problem = _problem([(20, 37), (0, 5)], dtype, heads=heads, kv_heads=kv_heads, dim=dim)
    got = _run(kernel.paged_prefill, problem, dim**-0.5)
    want = _run(kernel.reference_prefill, problem, dim**-0.5)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_query_never_reads_a_later_key_or_a_slot_past_its_context(dtype: torch.dtype) -> None:
    problem = _problem([(10, 20)], dtype)
    _, key_cache, value_cache, tables, _, _, contexts = problem
    before = _run(kernel.paged_prefill, problem, 0.125)
    # Change the keys and values of the last position and poison every slot past the context:
    # only the last query (the one at that position) may move.
    last = int(contexts[0]) - 1
    key_cache[tables[0, last // 16], last % 16] += 1.0
    value_cache[tables[0, last // 16], last % 16] += 1.0
    for pos in range(last + 1, 16 * -(-(last + 1) // 16)):
        key_cache[tables[0, pos // 16], pos % 16] = 1e4
        value_cache[tables[0, pos // 16], pos % 16] = float("nan")
    after = _run(kernel.paged_prefill, problem, 0.125)
    torch.testing.assert_close(after[:19], before[:19])
    assert not torch.allclose(after[19], before[19])


def test_rejects_inputs_that_do_not_fit() -> None:
    problem = list(_problem([(0, 8), (4, 20)], torch.float32))
    out = torch.zeros(problem[0].shape[0], 9 * 64)
    with pytest.raises(RuntimeError, match="share a dtype"):
        kernel.paged_prefill(problem[0].double(), *problem[1:], 0.1, out)
    with pytest.raises(RuntimeError, match="block_tables"):
        kernel.paged_prefill(*problem[:3], problem[3].int(), *problem[4:], 0.1, out)
    longer = [*problem[:5], torch.tensor([9, 20]), problem[6]]  # 9 queries, an 8-token context
    with pytest.raises(RuntimeError, match="longer than its context"):
        kernel.paged_prefill(*longer, 0.1, out)
    short_table = [*problem[:3], problem[3][:, :1].contiguous(), *problem[4:]]  # 24 need 2
    with pytest.raises(RuntimeError, match="shorter than its context"):
        kernel.paged_prefill(*short_table, 0.1, out)
    with pytest.raises(RuntimeError, match="head sizes"):
        small = _problem([(0, 4)], torch.float32, heads=2, kv_heads=1, dim=32)
        kernel.paged_prefill(*small, 0.1, torch.zeros(small[0].shape[0], 64))


@pytest.mark.parametrize(
    "chunks",
    [
        [(0, 40)],
        [(0, 17), (120, 1), (30, 9), (3, 1), (0, 2)],  # prefills around decodes
    ],
)
def test_a_step_through_the_kernel_matches_the_sdpa_path(chunks: list[tuple[int, int]]) -> None:
    """The same step through the model's attention, kernel metadata against per-chunk SDPA."""
    plan = _plan(chunks)
    cpu = torch.device("cpu")
    fused = build_model_inputs(plan, block_size=4, device=cpu, fused_prefill=True).attention
    per_chunk = build_model_inputs(plan, block_size=4, device=cpu).attention
    assert fused.prefill_batch is not None and not fused.prefills
    q, key_cache, value_cache, key, value = written_step(fused, dim=64)
    got = paged_attention(q, key_cache, value_cache, fused, key, value)
    want = paged_attention(q, key_cache, value_cache, per_chunk, key, value)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_serves_float32_and_bfloat16_on_amx_tiles_or_without_amx() -> None:
    # float32 wherever the kernel is built; bfloat16 where its AMX path runs, and on CPUs
    # without AMX (SDPA's AMX flash kernel beat the vector path, its avx512 one did not);
    # other dtypes never.
    assert kernel.serves(torch.float32)
    # SDPA keeps bfloat16 only where it has AMX and this kernel's tiles do not run.
    amx_tiles = bool(torch.ops.deepserve_flowserve.amx_tiles())
    assert kernel.serves(torch.bfloat16) == (amx_tiles or not library.cpu_has("amx_bf16"))
    assert not kernel.serves(torch.float16)
