"""The linear kernel chosen per device and dtype: oneDNN on CPU, equal to F.linear."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deepserve.flowserve.model.config import ModelConfig
from deepserve.flowserve.model.linear_kernel import (
    ONEDNN_ENV,
    PREPACK_ENV,
    OneDNNLinear,
    linear_kernel,
)
from deepserve.flowserve.model.llama import LlamaForCausalLM
from tests.unit.flowserve.runner.tiny_models import save_tiny_model

CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 8, 300])
def test_cpu_kernel_is_onednn_and_matches_f_linear(dtype: torch.dtype, rows: int) -> None:
    linear = linear_kernel(CPU, dtype)
    # oneDNN's bfloat16 matmul needs avx512bw/vl/dq or avx_ne_convert (not on AVX2-only CPUs);
    # without it the probe fails and F.linear serves.
    onednn = dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert isinstance(linear, OneDNNLinear) if onednn else linear is F.linear
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=generator).to(dtype)
    weight = torch.randn(160, 96, generator=generator).to(dtype)
    bias = torch.randn(160, generator=generator).to(dtype)
    atol = 1e-4 if dtype == torch.float32 else 0.1
    for b in (None, bias):
        got = linear(x, weight, b)
        assert got.dtype == dtype and got.shape == (rows, 160)
        torch.testing.assert_close(got, F.linear(x, weight, b), atol=atol, rtol=1e-2)


def test_a_view_of_a_larger_input_is_read_where_it_lies() -> None:
    """The model passes slices (a chunk of gate_up, the attention output): same answer."""
    linear = linear_kernel(CPU, torch.float32)
    whole = torch.randn(8, 192)
    part = whole[:, 96:]
    weight = torch.randn(32, 96)
    torch.testing.assert_close(linear(part, weight, None), F.linear(part, weight))


def test_the_setting_and_other_devices_keep_f_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    assert linear_kernel(torch.device("cuda"), torch.float32) is F.linear
    assert linear_kernel(CPU, torch.float16) is F.linear
    monkeypatch.setenv(ONEDNN_ENV, "0")
    assert linear_kernel(CPU, torch.float32) is F.linear


def test_weights_are_reordered_a_slice_per_step_and_answers_do_not_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(PREPACK_ENV, "1")
    linear = linear_kernel(CPU, torch.float32)
    assert isinstance(linear, OneDNNLinear)
    weights = [torch.randn(256, 128) for _ in range(5)]  # 128 KiB each
    x = torch.randn(8, 128)
    before = [linear(x, w, None) for w in weights]
    linear.register(weights)
    assert linear.pending == 5
    linear.pack_some(budget_bytes=256 << 10)  # two weights' worth
    assert linear.pending == 3
    linear.pack_some(budget_bytes=1)  # at least one per call
    assert linear.pending == 2
    while linear.pending:
        linear.pack_some()
    for w, expected in zip(weights, before, strict=True):
        torch.testing.assert_close(linear(x, w, None), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(linear(x, w, None), F.linear(x, w), atol=1e-4, rtol=1e-4)


def test_prepack_off_keeps_the_plain_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PREPACK_ENV, "0")
    linear = linear_kernel(CPU, torch.float32)
    assert isinstance(linear, OneDNNLinear)
    linear.register([torch.randn(16, 8)])
    assert linear.pending == 0


def test_a_model_gives_the_same_logits_before_and_after_its_weights_are_reordered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PREPACK_ENV, "1")
    model_dir = save_tiny_model(tmp_path / "tiny")
    config = ModelConfig.from_model_dir(model_dir)
    model = LlamaForCausalLM.load(model_dir, config, device=CPU, dtype=torch.float32)
    assert isinstance(model.linear, OneDNNLinear) and model.linear.pending > 0
    hidden = torch.randn(5, config.hidden_size)
    plain = model.compute_logits(hidden)
    while model.linear.pending:
        model.linear.pack_some()
    torch.testing.assert_close(model.compute_logits(hidden), plain, atol=1e-4, rtol=1e-4)
