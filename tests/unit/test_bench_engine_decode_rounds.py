"""bench.engine's batch-1 goal figure: each decode round against the bandwidth measured before it."""

from __future__ import annotations

import pytest

from bench.common import Bandwidth
from bench.engine import DecodeStep, paired_bound_ratios

WEIGHTS = 500_000_000  # bytes a decode step reads


def _round(*steps_ms: float) -> DecodeStep:
    return DecodeStep(context_len=100, step_s=[ms / 1e3 for ms in steps_ms], forward_s=[])


def test_each_round_is_divided_by_its_own_bound() -> None:
    # 25 GB/s: a 20 ms bound; 50 GB/s: 10 ms. The same 20 ms steps are 1x the first round's
    # bound and 2x the second's; against the best bandwidth of the run both would read 2x.
    rounds = [_round(19.0, 20.0, 21.0), _round(20.0, 20.0, 30.0)]
    probes = [Bandwidth(WEIGHTS, 25.0, 25.0), Bandwidth(WEIGHTS, 50.0, 50.0)]
    ratios = paired_bound_ratios(rounds, probes, WEIGHTS)
    assert ratios == pytest.approx([1.0, 2.0])


def test_rounds_and_probes_must_pair_up() -> None:
    with pytest.raises(ValueError, match="2 decode rounds but 1 bandwidth"):
        paired_bound_ratios([_round(1.0), _round(1.0)], [Bandwidth(WEIGHTS, 1.0, 1.0)], WEIGHTS)
