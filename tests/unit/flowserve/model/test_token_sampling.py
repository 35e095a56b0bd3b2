"""The token sampling kernel against torch: argmax, the inverse-CDF draw, masked tokens, input
checks; and the sampler's two paths drawing the same tokens from the same seeds."""

from __future__ import annotations

import math

import pytest
import torch

from deepserve.flowserve.kernels import library
from deepserve.flowserve.kernels import token_sampling as ts
from deepserve.flowserve.sampling.sampler import Sampler
from deepserve.flowserve.sampling.state import SamplingState
from deepserve.sampling_params import SamplingParams


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    # This machine kind has a compiler; a build failure is a failure, not a skip.
    library.build()
    assert ts.available(), "the sampling kernel did not load or disagreed with torch"


def _middle_of(logits: torch.Tensor, token: int, inverse_temperature: float) -> float:
    """The uniform at the middle of `token`'s interval of the row's CDF (float64)."""
    weights = ((logits.double() - logits.double().max()) * inverse_temperature).exp()
    cdf = weights.cumsum(0)
    return float((cdf[token] - weights[token] / 2) / cdf[-1])


@pytest.mark.parametrize("vocab", [49152, 1000, 37])  # SmolLM2's, and sizes 16 does not divide
def test_greedy_rows_are_torch_argmax_with_ties_to_the_first(vocab: int) -> None:
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(9, vocab, generator=generator)
    logits[3, :] = 1.0  # all tied: index 0
    logits[4, vocab // 2] = logits[4, vocab - 1] = 50.0  # two maxima: the first
    got = ts.sample_tokens(logits, torch.zeros(9), torch.rand(9, generator=generator))
    assert torch.equal(got, logits.argmax(dim=-1))
    assert got[3] == 0 and got[4] == vocab // 2


@pytest.mark.parametrize("inverse_temperature", [1.0, 0.25, 3.0])
def test_draws_land_on_the_token_whose_interval_holds_the_uniform(
    inverse_temperature: float,
) -> None:
    generator = torch.Generator().manual_seed(int(inverse_temperature * 100))
    rows, vocab = 12, 3001
    logits = torch.randn(rows, vocab, generator=generator) * 2
    # Tokens whose interval a float32 uniform can hit: probability above 1e-4.
    probs = torch.softmax(logits.double() * inverse_temperature, dim=-1)
    wanted = torch.stack(
        [
            torch.nonzero(probs[r] > 1e-4).flatten()[r % int((probs[r] > 1e-4).sum())]
            for r in range(rows)
        ]
    )
    wanted[0] = logits[0].argmax()  # the likeliest token, too
    uniform = torch.tensor(
        [_middle_of(logits[r], int(wanted[r]), inverse_temperature) for r in range(rows)]
    )
    got = ts.sample_tokens(logits, torch.full((rows,), inverse_temperature), uniform)
    assert torch.equal(got, wanted)
    inverse = torch.full((rows,), inverse_temperature)
    assert torch.equal(got, ts.reference_sample_tokens(logits, inverse, uniform))


def test_masked_tokens_are_never_drawn_even_at_the_extremes() -> None:
    vocab = 200
    logits = torch.full((6, vocab), -math.inf)
    allowed = [5, 17, 18, 150]
    logits[:, allowed] = torch.tensor([0.3, -1.0, 2.0, 0.0])
    # u at 0, just below 1, and a tiny temperature that floors all but the max.
    uniform = torch.tensor([0.0, 1.0 - 2**-24, 0.5, 0.999, 0.0, 1.0 - 2**-24])
    inverse = torch.tensor([1.0, 1.0, 1.0, 1.0, 1000.0, 1000.0])
    got = ts.sample_tokens(logits, inverse, uniform).tolist()
    assert all(token in allowed for token in got)
    assert got[0] == 5 and got[1] == 150  # first and last tokens of nonzero weight
    assert got[4] == got[5] == 18  # the max alone weighs anything at T = 1/1000


def test_draws_follow_the_tempered_softmax() -> None:
    logits = torch.tensor([0.0, 1.0, 2.0, -math.inf, 0.5] + [-math.inf] * 20)
    draws = 20000
    generator = torch.Generator().manual_seed(3)
    got = ts.sample_tokens(
        logits.repeat(draws, 1), torch.full((draws,), 0.5), torch.rand(draws, generator=generator)
    )
    observed = torch.bincount(got, minlength=25).double() / draws
    expected = torch.softmax(logits.double() * 0.5, dim=-1)
    assert observed[3] == 0 and observed[5:].sum() == 0
    assert torch.allclose(observed, expected, atol=0.015)


def test_bad_input_is_refused() -> None:
    logits = torch.randn(2, 10)
    ones, half = torch.ones(2), torch.full((2,), 0.5)
    with pytest.raises(RuntimeError, match="float32"):
        ts.sample_tokens(logits.double(), ones, half)
    with pytest.raises(RuntimeError, match=r"\[rows, vocab\]"):
        ts.sample_tokens(logits[0], ones, half)
    with pytest.raises(RuntimeError, match=r"\[rows\]"):
        ts.sample_tokens(logits, torch.ones(3), half)
    with pytest.raises(RuntimeError, match="vocabulary"):
        ts.sample_tokens(torch.empty(2, 0), ones, half)


def test_the_sampler_draws_the_same_tokens_on_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeded rows draw the same uniforms on either path, so the tokens agree (a draw within
    float rounding of a boundary between two tokens may differ; none of these is)."""
    generator = torch.Generator().manual_seed(11)
    logits = torch.randn(40, 49152, generator=generator) * 1.5
    params = [
        SamplingParams(seed=i, temperature=[1.0, 0.7, 1.3, 0.0][i % 4], max_tokens=8)
        for i in range(40)
    ]

    def run() -> list[int]:
        sampler = Sampler()
        states = [SamplingState(p) for p in params]
        return [r.token_id for _ in range(5) for r in sampler.sample(logits, states)]

    on_kernel = run()
    monkeypatch.setattr(ts, "available", lambda: False)
    on_torch = run()
    assert len(set(on_kernel)) > 100  # real draws, not greedy
    assert on_kernel == on_torch
