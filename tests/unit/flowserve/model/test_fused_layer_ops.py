"""The fused C++ layer ops against eager torch, and the model's two op sets against each other."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deepserve.flowserve.engine.step_plan import StepPlan, StepSequence
from deepserve.flowserve.kernels import fused_layer_ops as ops
from deepserve.flowserve.kernels import library
from deepserve.flowserve.model.attention import write_kv
from deepserve.flowserve.model.layer_ops import EagerLayerOps, FusedLayerOps
from deepserve.flowserve.runner.model_runner import ModelRunner
from tests.unit.flowserve.runner.tiny_models import save_tiny_model

DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 1.6e-2)]


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    # This machine kind has a compiler; a build failure is a failure, not a skip.
    library.build()
    assert ops.available(), "the fused layer ops did not load or disagreed with eager torch"


def _close(got: torch.Tensor, want: torch.Tensor, tolerance: float) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize(("dtype", "tolerance"), DTYPES)
@pytest.mark.parametrize("hidden", [576, 37])  # SmolLM2's, and one no vector width divides
def test_norms_match_transformers_rmsnorm(
    dtype: torch.dtype, tolerance: float, hidden: int
) -> None:
    generator = torch.Generator().manual_seed(hidden)
    x = torch.randn(33, hidden, generator=generator).to(dtype)
    delta = torch.randn(33, hidden, generator=generator).to(dtype)
    weight = torch.randn(hidden, generator=generator).to(dtype)
    _close(ops.rms_norm(x, weight, 1e-5), ops.reference_rms_norm(x, weight, 1e-5), tolerance)

    residual = x.clone()
    normed = ops.add_rms_norm(residual, delta, weight, 1e-5)
    _close(residual, x + delta, 0)  # the add happened in place, rounded like torch's
    _close(normed, ops.reference_rms_norm(x + delta, weight, 1e-5), tolerance)


@pytest.mark.parametrize(("dtype", "tolerance"), DTYPES)
@pytest.mark.parametrize("inter", [1536, 21])
def test_silu_mul_matches_eager(dtype: torch.dtype, tolerance: float, inter: int) -> None:
    generator = torch.Generator().manual_seed(inter)
    gate_up = (torch.randn(19, 2 * inter, generator=generator) * 8).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    _close(ops.silu_mul(gate_up), F.silu(gate) * up, tolerance)


@pytest.mark.parametrize(("dtype", "tolerance"), DTYPES)
def test_rotary_rotates_a_strided_view_in_place(dtype: torch.dtype, tolerance: float) -> None:
    """q and k heads as the model passes them: a view into the fused qkv projection."""
    generator = torch.Generator().manual_seed(3)
    heads, kv_heads, dim = 9, 3, 64
    qkv = torch.randn(7, (heads + 2 * kv_heads) * dim, generator=generator).to(dtype)
    value_before = qkv[:, (heads + kv_heads) * dim :].clone()
    qk = qkv[:, : (heads + kv_heads) * dim].view(7, heads + kv_heads, dim)
    want_input = qk.clone()
    positions = torch.tensor([0, 5, 1, 99, 3, 3, 42])
    angles = torch.rand(100, dim // 2, generator=generator) * 10
    ops.rotary_(qk, positions, angles.cos(), angles.sin())
    _close(qk, ops.reference_rotary(want_input, positions, angles.cos(), angles.sin()), tolerance)
    assert torch.equal(qkv[:, (heads + kv_heads) * dim :], value_before)  # values untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_stores_strided_slices_at_their_slots_and_nothing_else(dtype: torch.dtype) -> None:
    """Keys and values as the model passes them (views into the fused qkv projection), into a
    cache that already holds other sequences' blocks."""
    generator = torch.Generator().manual_seed(4)
    heads, kv_heads, dim, tokens = 9, 3, 64, 21
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=generator).to(dtype)
    key = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    value = qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim)
    key_cache = torch.randn(10, 16, kv_heads, dim, generator=generator).to(dtype)
    value_cache = torch.randn(10, 16, kv_heads, dim, generator=generator).to(dtype)
    slots = torch.randperm(160, generator=generator)[:tokens]
    want_keys, want_values = key_cache.clone(), value_cache.clone()
    want_keys.view(-1, kv_heads, dim).index_copy_(0, slots, key)
    want_values.view(-1, kv_heads, dim).index_copy_(0, slots, value)
    ops.write_kv_(key_cache, value_cache, slots, key, value)
    assert torch.equal(key_cache, want_keys) and torch.equal(value_cache, want_values)


def test_model_kv_writes_take_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """attention.write_kv calls the kernel for the model's strided slices, and index_copy_
    for keys whose heads are not laid out row by row; both store the same."""
    calls: list[int] = []
    kernel = ops.write_kv_
    monkeypatch.setattr(ops, "write_kv_", lambda *a: (calls.append(1), kernel(*a))[1])
    key_cache = torch.zeros(4, 16, 3, 8)
    value_cache = torch.zeros(4, 16, 3, 8)
    kv = torch.randn(5, 2, 3, 8)
    slots = torch.tensor([3, 17, 40, 41, 63])
    write_kv(key_cache, value_cache, slots, kv[:, 0], kv[:, 1])
    transposed = torch.randn(5, 8, 3).transpose(1, 2)  # [5, 3, 8], dim not innermost
    other_keys, other_values = torch.zeros(4, 16, 3, 8), torch.zeros(4, 16, 3, 8)
    write_kv(other_keys, other_values, slots, transposed, kv[:, 1])
    assert calls == [1]
    assert torch.equal(key_cache.view(-1, 3, 8)[slots], kv[:, 0])
    assert torch.equal(value_cache.view(-1, 3, 8)[slots], kv[:, 1])
    assert torch.equal(other_keys.view(-1, 3, 8)[slots], transposed)
    assert torch.equal(other_values.view(-1, 3, 8)[slots], kv[:, 1])


def test_bad_inputs_are_rejected() -> None:
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="share a dtype"):
        ops.rms_norm(x, torch.randn(8).double(), 1e-5)
    with pytest.raises(RuntimeError, match="residual's shape"):
        ops.add_rms_norm(x, torch.randn(4, 9), torch.randn(8), 1e-5)
    with pytest.raises(RuntimeError, match="float32 and bfloat16"):
        ops.silu_mul(x.double())
    cos = torch.rand(10, 4)
    with pytest.raises(RuntimeError, match="outside the table"):
        ops.rotary_(torch.randn(2, 1, 8), torch.tensor([0, 10]), cos, cos)
    caches = torch.zeros(2, 3, 4, 2, 8).unbind(0)
    kv = torch.randn(2, 2, 8)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.write_kv_(*caches, torch.tensor([0, 12]), kv, kv)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.write_kv_(*caches, torch.tensor([-1, 0]), kv, kv)
    with pytest.raises(RuntimeError, match="cache's dtype"):
        ops.write_kv_(*caches, torch.tensor([0, 1]), kv.double(), kv.double())
    with pytest.raises(RuntimeError, match="one slot per token"):
        ops.write_kv_(*caches, torch.tensor([0]), kv, kv)
    assert int(caches[0].count_nonzero()) == 0  # nothing written by a refused call


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v biases
def test_model_forward_is_the_same_with_fused_and_eager_ops(tmp_path: Path, family: str) -> None:
    """A prefill and a decode step of a checkpoint through both op sets."""
    model_dir = save_tiny_model(tmp_path / family, family=family)
    runner = ModelRunner(model_dir, "cpu", torch.float32, num_blocks=16, block_size=4)
    assert isinstance(runner.model.ops, FusedLayerOps)
    prefill = StepPlan(step_id=0, sequences=[StepSequence("r", [5, 9, 2, 7, 1], 0, [3, 8])])
    decode = StepPlan(step_id=1, sequences=[StepSequence("r", [4], 5, [3, 8])])
    fused = [runner.execute(prefill), runner.execute(decode)]
    model = runner.model
    model.ops = EagerLayerOps(model.rotary, model.config.hidden_size, model.config.rms_norm_eps)
    eager = [runner.execute(prefill), runner.execute(decode)]
    for got, want in zip(fused, eager, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
