"""Decode-length bucket prediction from max_tokens and per-(model, tenant) history."""

from __future__ import annotations

import random

from deepserve.scheduler.decode_predictor import MIN_HISTORY, DecodeLengthPredictor


def test_without_history_the_guess_is_max_tokens_or_the_default() -> None:
    p = DecodeLengthPredictor(bucket_tokens=128, default_tokens=256)
    assert p.predict("m", "t", max_tokens=50).tokens == 50
    assert p.predict("m", "t", max_tokens=50).bucket == 0
    assert p.predict("m", "t").tokens == 256
    assert not p.predict("m", "t").from_history


def test_history_gives_the_most_likely_bucket_capped_by_max_tokens() -> None:
    p = DecodeLengthPredictor(bucket_tokens=128)
    for _ in range(10):
        p.observe("m", "t", 600)  # bucket 4
    for _ in range(3):
        p.observe("m", "t", 20)  # bucket 0
    assert p.predict("m", "t").bucket == 4
    assert p.predict("m", "t").from_history
    # Outputs cannot exceed max_tokens: the long mass folds into max_tokens' bucket.
    capped = p.predict("m", "t", max_tokens=200)
    assert (capped.bucket, capped.tokens) == (1, 200)


def test_tenants_are_separate_and_fall_back_to_the_model_history() -> None:
    p = DecodeLengthPredictor(bucket_tokens=128)
    for _ in range(MIN_HISTORY):
        p.observe("m", "short", 10)
        p.observe("m", "long", 1000)
    assert p.predict("m", "short").bucket == 0
    assert p.predict("m", "long").bucket == p.bucket_of(1000)
    assert p.predict("m", "newcomer").from_history  # the model's pooled history


def test_prequential_accuracy_on_a_skewed_workload() -> None:
    """Each tenant has a typical length; the predictor should learn it (report the figure)."""
    rng = random.Random(0)
    p = DecodeLengthPredictor(bucket_tokens=128)
    typical = {"chat": 90, "summarize": 300, "code": 700}
    for _ in range(600):
        tenant = rng.choice(list(typical))
        length = max(1, int(rng.gauss(typical[tenant], 25)))
        p.observe("m", tenant, length, max_tokens=1024)
    assert p.predictions == 600
    assert p.accuracy > 0.75, p.accuracy
