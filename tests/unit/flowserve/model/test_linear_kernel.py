"""The linear kernel chosen per device and dtype: oneDNN on CPU, equal to F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepserve.flowserve.model.linear_kernel import ONEDNN_ENV, linear_kernel

CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 8, 300])
def test_cpu_kernel_is_onednn_and_matches_f_linear(dtype: torch.dtype, rows: int) -> None:
    linear = linear_kernel(CPU, dtype)
    assert linear is not F.linear
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
