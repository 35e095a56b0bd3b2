"""The skinny (decode-sized) linear kernel: built here, checked against F.linear, and used by the
CPU linear for calls of few rows once a weight is packed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepserve.flowserve.kernels import library
from deepserve.flowserve.kernels import skinny_linear as kernel
from deepserve.flowserve.model.linear_kernel import OneDNNLinear, linear_kernel
from tests.unit.flowserve.model.thread_counts import same_bits_at_every_thread_count

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    # This machine kind has a compiler and AVX-512 or AVX2; a build failure is a failure, not a skip.
    library.build()
    assert kernel.available(torch.float32), "the built kernel did not load or disagreed"


def _dtypes() -> list[torch.dtype]:
    # bfloat16 needs avx512_bf16; the probe leaves it out where the CPU lacks it.
    return [d for d in (torch.float32, torch.bfloat16) if kernel.available(d)]


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 16, 31, 64])
@pytest.mark.parametrize("out_features", [32, 45, 960])
def test_matches_f_linear(rows: int, out_features: int) -> None:
    for dtype in _dtypes():
        generator = torch.Generator().manual_seed(rows * 1000 + out_features)
        weight = (torch.randn(out_features, 576, generator=generator) * 0.05).to(dtype)
        bias = torch.randn(out_features, generator=generator).to(dtype)
        x = torch.randn(rows, 576, generator=generator).to(dtype)
        panels = kernel.pack(weight)
        tolerance = 1e-4 if dtype == torch.float32 else 3e-2
        for b in (None, bias):
            got = kernel.linear(x, panels, out_features, b)
            assert got.dtype == dtype and got.shape == (rows, out_features)
            want = F.linear(x.double(), weight.double(), None if b is None else b.double())
            torch.testing.assert_close(got.double(), want, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("rows", [1, 8, 32])
def test_threads_taking_panels_as_they_free_up_give_the_same_bits(rows: int) -> None:
    """Each panel's sums are one thread's, in k order, whichever thread takes it: the result
    cannot depend on how the panels were shared out (nor may two threads share accumulators)."""
    generator = torch.Generator().manual_seed(rows)
    for out_features in (64, 960, 3072):  # 2, 30 and 96 panels
        weight = torch.randn(out_features, 576, generator=generator) * 0.05
        x = torch.randn(rows, 576, generator=generator)
        panels = kernel.pack(weight)
        same_bits_at_every_thread_count(kernel.linear, x, panels, out_features, None)


def test_a_strided_view_is_read_as_its_values() -> None:
    """The model passes slices (the attention output, a chunk of gate_up)."""
    whole = torch.randn(8, 192)
    part = whole[:, 96:]
    weight = torch.randn(64, 96)
    got = kernel.linear(part, kernel.pack(weight), 64, None)
    torch.testing.assert_close(got, F.linear(part, weight), atol=1e-4, rtol=1e-4)


def test_rejects_what_it_cannot_serve() -> None:
    weight = torch.randn(64, 96)
    panels = kernel.pack(weight)
    with pytest.raises(RuntimeError, match="at most 64 rows"):
        kernel.linear(torch.randn(65, 96), panels, 64, None)
    with pytest.raises(RuntimeError, match="wrong K"):
        kernel.linear(torch.randn(4, 95), panels, 64, None)
    with pytest.raises(RuntimeError, match="dtype"):
        kernel.linear(torch.randn(4, 96).to(torch.bfloat16), panels, 64, None)


def test_the_cpu_linear_takes_few_rows_to_the_panels_and_many_to_onednn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    linear = linear_kernel(CPU, torch.float32)
    assert isinstance(linear, OneDNNLinear)
    assert linear.skinny_rows == kernel.max_rows(torch.float32) > 0
    # 8 rows a register tile with AVX-512; 2 with AVX2, where oneDNN wins from ~40 rows.
    assert kernel.max_rows(torch.float32) == (64 if library.cpu_has("avx512f") else 32)
    weight = torch.randn(160, 96)
    linear.register([weight])
    linear.pack_some()
    calls: list[int] = []
    real = kernel.linear

    def counted(x: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(x.shape[0])
        return real(x, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(kernel, "linear", counted)
    for rows in (1, kernel.max_rows(torch.float32), kernel.max_rows(torch.float32) + 1, 300):
        x = torch.randn(rows, 96)
        torch.testing.assert_close(
            linear(x, weight, None), F.linear(x, weight), atol=1e-4, rtol=1e-4
        )
    assert calls == [1, kernel.max_rows(torch.float32)]


def test_the_switch_keeps_onednn_for_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(library, "_usable", {})
    monkeypatch.setenv(kernel.KERNEL_ENV, "0")
    linear = linear_kernel(CPU, torch.float32)
    assert isinstance(linear, OneDNNLinear) and linear.skinny_rows == 0


def test_bfloat16_takes_32_rows_on_amx_tiles_4_beside_onednns_amx_and_64_without_amx() -> None:
    amx = bool(torch.ops.deepserve_flowserve.amx_tiles())
    most = kernel.max_rows(torch.bfloat16)
    if not library.cpu_has("avx512_bf16"):
        # No bfloat16 path is built without avx512_bf16: every call stays with oneDNN.
        assert not kernel.available(torch.bfloat16) and most == 0
        return
    assert most == (32 if amx else 4 if library.cpu_has("amx_bf16") else 64)
    # The rows the kernel takes, at the AMX path's edges (one and two row tiles, K in 32-value
    # chunks) and up to the most, agree with F.linear whichever path this host runs.
    generator = torch.Generator().manual_seed(3)
    weight = (torch.randn(70, 1536, generator=generator) * 0.05).to(torch.bfloat16)
    panels = kernel.pack(weight)
    for rows in sorted({1, 16, 17, 32, 33, most} & set(range(1, max(most, 32) + 1))):
        x = torch.randn(rows, 1536, generator=generator).to(torch.bfloat16)
        want = F.linear(x.float(), weight.float())
        got = kernel.linear(x, panels, 70, None).float()
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
