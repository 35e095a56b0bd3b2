"""Sampler, penalties and SamplingParams validation."""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import pytest
import torch

from deepserve.errors import InvalidArgument
from deepserve.flowserve.kernels import library, token_sampling
from deepserve.flowserve.sampling.penalties import apply_penalties
from deepserve.flowserve.sampling.sampler import Sampler
from deepserve.flowserve.sampling.state import SamplingState
from deepserve.sampling_params import SamplingParams

torch.set_num_threads(1)


@pytest.fixture(autouse=True, params=["kernel", "torch"])
def pick_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs on both of the sampler's paths: the CPU kernel and plain torch."""
    if request.param == "kernel":
        library.build()  # this machine kind has a compiler: a build failure fails the test
        assert token_sampling.available(), "the sampling kernel did not load or disagreed"
    else:
        monkeypatch.setattr(token_sampling, "available", lambda: False)
    return str(request.param)


VOCAB = 64
# A 4-token distribution with known probabilities, padded with impossible tokens.
PROBS = [0.5, 0.3, 0.15, 0.05]


def _known_logits(rows: int) -> torch.Tensor:
    logits = torch.full((rows, 8), -math.inf)
    logits[:, :4] = torch.tensor(PROBS).log()
    return logits


def _state(**params: Any) -> SamplingState:
    return SamplingState(SamplingParams(**params))


def _frequencies(tokens: list[int], size: int) -> list[float]:
    counts = torch.bincount(torch.tensor(tokens), minlength=size).tolist()
    return [c / len(tokens) for c in counts]


def test_params_import_without_torch() -> None:
    code = "import sys; from deepserve.sampling_params import SamplingParams; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_greedy_is_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, VOCAB)
    results = Sampler().sample(logits, [_state(temperature=0.0) for _ in range(5)])
    assert [r.token_id for r in results] == logits.argmax(dim=-1).tolist()


def test_sample_leaves_input_logits_untouched() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, VOCAB)
    before = logits.clone()
    states = [
        SamplingState(SamplingParams(presence_penalty=1.0, top_k=5), output_token_ids=[1, 2]),
        _state(temperature=0.5, top_p=0.5),
    ]
    Sampler().sample(logits, states)
    assert torch.equal(logits, before)


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    torch.manual_seed(1)
    logits = torch.randn(6, VOCAB)
    expected = logits.argmax(dim=-1).tolist()
    top_k_one = Sampler().sample(logits, [_state(temperature=1.5, top_k=1) for _ in range(6)])
    tiny_top_p = Sampler().sample(logits, [_state(temperature=1.5, top_p=1e-6) for _ in range(6)])
    assert [r.token_id for r in top_k_one] == expected
    assert [r.token_id for r in tiny_top_p] == expected


def test_unseeded_sampling_follows_the_distribution() -> None:
    torch.manual_seed(2)
    rows = 20000
    results = Sampler().sample(_known_logits(rows), [_state() for _ in range(rows)])
    freqs = _frequencies([r.token_id for r in results], 8)
    for observed, expected in zip(freqs[:4], PROBS, strict=True):
        assert abs(observed - expected) < 0.015
    assert freqs[4:] == [0.0] * 4  # -inf logits are never picked


def test_temperature_reshapes_the_distribution() -> None:
    torch.manual_seed(3)
    rows, temperature = 20000, 0.5
    results = Sampler().sample(
        _known_logits(rows), [_state(temperature=temperature) for _ in range(rows)]
    )
    expected = torch.softmax(torch.tensor(PROBS).log() / temperature, dim=-1).tolist()
    freqs = _frequencies([r.token_id for r in results], 8)
    for observed, target in zip(freqs[:4], expected, strict=True):
        assert abs(observed - target) < 0.015


def test_top_k_top_p_min_p_restrict_the_support() -> None:
    torch.manual_seed(4)
    rows = 4000
    sampler = Sampler()
    cases = [
        ({"top_k": 2}, {0, 1}),
        ({"top_p": 0.75}, {0, 1}),  # mass before token 2 is 0.8 >= 0.75
        ({"top_p": 0.9}, {0, 1, 2}),
        ({"min_p": 0.2}, {0, 1, 2}),  # floor 0.1: only token 3 (0.05) goes
        ({"min_p": 0.5}, {0, 1}),  # floor 0.25
        ({"top_k": 3, "min_p": 0.5}, {0, 1}),
        ({}, {0, 1, 2, 3}),
    ]
    for params, support in cases:
        results = sampler.sample(_known_logits(rows), [_state(**params) for _ in range(rows)])
        assert {r.token_id for r in results} == support, params


def test_mixed_batch_applies_each_rows_own_params() -> None:
    torch.manual_seed(5)
    rows = 3000
    states = []
    for i in range(rows):
        states.append(
            _state(top_k=1) if i % 3 == 0 else _state(top_p=0.75) if i % 3 == 1 else _state()
        )
    results = Sampler().sample(_known_logits(rows), states)
    by_kind: list[set[int]] = [set(), set(), set()]
    for i, result in enumerate(results):
        by_kind[i % 3].add(result.token_id)
    assert by_kind == [{0}, {0, 1}, {0, 1, 2, 3}]


def _run_steps(seed_row_logits: torch.Tensor, position: int, batch: int, steps: int) -> list[int]:
    """Sample `steps` tokens for one seeded request sitting at `position` in a noisy batch."""
    sampler = Sampler()
    seeded = _state(seed=1234, temperature=1.0)
    tokens = []
    for step in range(steps):
        torch.manual_seed(1000 + step + batch)  # other rows differ between runs
        logits = torch.randn(batch, VOCAB)
        logits[position] = seed_row_logits
        others = [_state(seed=step + i) if i % 2 else _state() for i in range(batch)]
        others[position] = seeded
        tokens.append(sampler.sample(logits, others)[position].token_id)
    return tokens


def test_seeded_sampling_is_reproducible_across_batch_composition() -> None:
    torch.manual_seed(6)
    row = torch.randn(VOCAB) * 0.5  # flat enough that draws vary
    alone = _run_steps(row, position=0, batch=1, steps=30)
    assert len(set(alone)) > 3  # really random, not greedy
    assert _run_steps(row, position=0, batch=1, steps=30) == alone
    assert _run_steps(row, position=3, batch=5, steps=30) == alone
    assert _run_steps(row, position=6, batch=7, steps=30) == alone
    other_seed = SamplingState(SamplingParams(seed=99))
    sampler = Sampler()
    different = [sampler.sample(row.unsqueeze(0), [other_seed])[0].token_id for _ in range(30)]
    assert different != alone


def test_seeded_sampling_follows_the_distribution() -> None:
    state = _state(seed=7)
    sampler = Sampler()
    tokens = [sampler.sample(_known_logits(1), [state])[0].token_id for _ in range(3000)]
    freqs = _frequencies(tokens, 8)
    for observed, expected in zip(freqs[:4], PROBS, strict=True):
        assert abs(observed - expected) < 0.035


def test_presence_and_frequency_penalties_subtract_exact_amounts() -> None:
    logits = torch.zeros(2, 8)
    states = [
        SamplingState(SamplingParams(presence_penalty=0.5), output_token_ids=[3, 3, 5]),
        SamplingState(SamplingParams(frequency_penalty=0.25), output_token_ids=[3, 3, 5]),
    ]
    apply_penalties(logits, states)
    assert logits[0].tolist() == [0, 0, 0, -0.5, 0, -0.5, 0, 0]
    assert logits[1].tolist() == [0, 0, 0, -0.5, 0, -0.25, 0, 0]


def test_negative_presence_penalty_encourages_repeats() -> None:
    logits = torch.zeros(1, 4)
    apply_penalties(
        logits, [SamplingState(SamplingParams(presence_penalty=-1.0), output_token_ids=[2])]
    )
    assert logits[0].tolist() == [0, 0, 1.0, 0]


def test_repetition_penalty_covers_prompt_and_output_hf_style() -> None:
    logits = torch.tensor([[2.0, -1.0, 2.0, -1.0, 4.0, 0.5]])
    state = SamplingState(
        SamplingParams(repetition_penalty=2.0), prompt_token_ids=[0, 1, 1], output_token_ids=[4]
    )
    apply_penalties(logits, [state])
    # Seen tokens (0, 1 in the prompt; 4 in the output) lose: positive halved, negative doubled.
    assert logits[0].tolist() == [1.0, -2.0, 2.0, -1.0, 2.0, 0.5]


def test_penalties_only_touch_rows_that_ask() -> None:
    logits = torch.zeros(3, 4)
    states = [
        SamplingState(SamplingParams(), output_token_ids=[1]),
        SamplingState(SamplingParams(presence_penalty=1.0), output_token_ids=[1]),
        SamplingState(SamplingParams(), output_token_ids=[1]),
    ]
    apply_penalties(logits, states)
    assert logits.tolist() == [[0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, 0, 0]]


def test_penalty_changes_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.5, 0.0, 0.0]])
    plain = SamplingState(SamplingParams(temperature=0.0), output_token_ids=[0])
    penalized = SamplingState(
        SamplingParams(temperature=0.0, presence_penalty=1.0), output_token_ids=[0]
    )
    results = Sampler().sample(logits.repeat(2, 1), [plain, penalized])
    assert [r.token_id for r in results] == [0, 1]


def test_min_tokens_blocks_eos_and_stop_tokens() -> None:
    logits = torch.tensor([[0.0, 10.0, 9.0, 1.0]])  # eos=1 then stop token 2 are favourites
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[2])
    state = SamplingState(params, output_token_ids=[], eos_token_ids=[1])
    sampler = Sampler()
    assert sampler.sample(logits, [state])[0].token_id == 3
    state.output_token_ids.extend([3, 3])
    assert sampler.sample(logits, [state])[0].token_id == 1
    ignoring = SamplingState(
        SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True), eos_token_ids=[1]
    )
    assert sampler.sample(logits, [ignoring])[0].token_id == 1  # eos is not a stop: no mask


def test_logprobs_are_raw_log_softmax_with_sorted_top_n() -> None:
    torch.manual_seed(8)
    logits = torch.randn(3, VOCAB)
    states = [
        SamplingState(SamplingParams(temperature=0.7, logprobs=True, top_logprobs=5, seed=3)),
        _state(temperature=0.0),
        SamplingState(
            SamplingParams(temperature=0.0, logprobs=True, presence_penalty=2.0),
            output_token_ids=[int(logits[2].argmax())],
        ),
    ]
    results = Sampler().sample(logits, states)
    expected = torch.log_softmax(logits, dim=-1)
    first = results[0]
    assert first.logprob == pytest.approx(expected[0, first.token_id].item(), abs=1e-6)
    assert first.top_logprobs is not None and len(first.top_logprobs) == 5
    values, indices = expected[0].topk(5)
    assert [t for t, _ in first.top_logprobs] == indices.tolist()
    assert [v for _, v in first.top_logprobs] == pytest.approx(values.tolist(), abs=1e-6)
    assert [v for _, v in first.top_logprobs] == sorted(
        (v for _, v in first.top_logprobs), reverse=True
    )
    assert results[1].logprob is None and results[1].top_logprobs is None
    # Raw mode: the penalty moved the choice, but the logprob is the model's own.
    third = results[2]
    assert third.token_id != int(logits[2].argmax())
    assert third.logprob == pytest.approx(expected[2, third.token_id].item(), abs=1e-6)
    assert third.top_logprobs is None


def test_processed_logprobs_include_temperature_and_penalties() -> None:
    torch.manual_seed(9)
    logits = torch.randn(1, VOCAB)
    state = SamplingState(
        SamplingParams(temperature=0.5, logprobs=True, top_logprobs=2, frequency_penalty=1.0),
        output_token_ids=[4, 4],
    )
    result = Sampler(logprobs_mode="processed").sample(logits, [state])[0]
    adjusted = logits.clone()
    adjusted[0, 4] -= 2.0
    expected = torch.log_softmax(adjusted / 0.5, dim=-1)
    assert result.logprob == pytest.approx(expected[0, result.token_id].item(), abs=1e-5)
    assert result.top_logprobs is not None
    assert [t for t, _ in result.top_logprobs] == expected[0].topk(2).indices.tolist()


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError):
        Sampler().sample(torch.zeros(2, 4), [_state()])
    assert Sampler().sample(torch.zeros(0, 4), []) == []


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.1}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"seed": 2**64}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": math.inf}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": [VOCAB]}, "stop_token_ids"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_validation_names_the_field(params: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        SamplingParams(**params).validate(vocab_size=VOCAB)
    assert info.value.field == field


def test_valid_params_pass_and_stop_string_is_listed() -> None:
    params = SamplingParams(
        temperature=2.0,
        top_p=1.0,
        top_k=-1,
        min_p=0.1,
        seed=-5,
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        stop="###",  # type: ignore[arg-type]
        stop_token_ids=[VOCAB - 1],
        max_tokens=1,
        logprobs=True,
        top_logprobs=20,
    )
    params.validate(vocab_size=VOCAB)
    assert params.stop == ["###"]
    SamplingParams(stop=["s"] * 16, stop_token_ids=[10**6]).validate()  # no vocab: any id >= 0


def test_finish_reason() -> None:
    params = SamplingParams(max_tokens=3, stop_token_ids=[7], min_tokens=1)
    eos = {2}
    assert params.finish_reason(5, 1, eos) is None
    assert params.finish_reason(2, 1, eos) is None  # the first min_tokens tokens cannot stop
    assert params.finish_reason(2, 2, eos) == "stop"
    assert params.finish_reason(7, 2, eos) == "stop"
    assert params.finish_reason(5, 3, eos) == "length"
    assert params.finish_reason(2, 3, eos) == "stop"
    assert SamplingParams(ignore_eos=True).finish_reason(2, 1, eos) is None
    assert SamplingParams(min_tokens=2).finish_reason(2, 1, eos) is None


@pytest.mark.parametrize("min_tokens", [0, 1, 3])
def test_eos_or_stop_id_ends_generation_only_after_min_tokens(min_tokens: int) -> None:
    params = SamplingParams(min_tokens=min_tokens, stop_token_ids=[7])
    eos = {2}
    # Output tokens 1..min_tokens (the boundary, EOS as exactly the min_tokens-th, included).
    for num_output_tokens in range(1, min_tokens + 1):
        assert params.check_stop(2, num_output_tokens, eos) is None
        assert params.check_stop(7, num_output_tokens, eos) is None
    assert params.check_stop(2, min_tokens + 1, eos) == ("stop", None)
    assert params.check_stop(7, min_tokens + 1, eos) == ("stop", 7)


def test_check_stop_prefers_eos_and_takes_the_resolved_max_tokens() -> None:
    params = SamplingParams(stop_token_ids=[2])
    assert params.check_stop(2, 1, {2}) == ("stop", None)  # EOS first: no stop token reported
    assert params.check_stop(5, 4, {2}) is None  # no max_tokens of its own
    assert params.check_stop(5, 4, {2}, max_tokens=4) == ("length", None)
    assert SamplingParams(ignore_eos=True).check_stop(2, 1, {2}) is None


def test_sampler_mask_and_stop_check_agree_on_min_tokens() -> None:
    params = SamplingParams(min_tokens=2, stop_token_ids=[7])
    state = SamplingState(params, output_token_ids=[], eos_token_ids=[2])
    for num_out in range(5):
        state.output_token_ids[:] = [0] * num_out
        masked = state.min_tokens_blocked_ids() == [2, 7]
        # The next token is output token num_out + 1: masked exactly when it could not stop.
        assert masked == (params.check_stop(2, num_out + 1, {2}) is None)
        assert masked == params.blocks_stop_tokens(num_out)
