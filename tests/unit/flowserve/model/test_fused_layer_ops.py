"""The fused C++ layer ops against eager torch, and the model's two op sets against each other."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deepserve.flowserve.engine.step_plan import StepPlan, StepSequence
from deepserve.flowserve.kernels import fused_layer_ops as ops
from deepserve.flowserve.kernels import library
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
