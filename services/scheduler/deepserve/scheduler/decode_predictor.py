"""Predicts a request's decode length as a bucket, from max_tokens and the history per tenant.

The paper predicts the output length bucket (128-token buckets) to feed the PD-aware choice.
Here the history of finished requests per (model, tenant) is a histogram over buckets; the
prediction is the most likely bucket once every outcome beyond max_tokens is folded into the
max_tokens bucket (an output cannot exceed it). With too little history the guess is
min(max_tokens, default). Accuracy is measured prequentially: each finished request is first
predicted, then counted into the history.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

MIN_HISTORY = 8


@dataclass(frozen=True, slots=True)
class Prediction:
    """A predicted bucket and the decode tokens it stands for (its upper edge, capped)."""

    bucket: int
    tokens: int
    from_history: bool


class DecodeLengthPredictor:
    """Output-length histograms per (model, tenant) and the bucket predictions drawn from them."""

    def __init__(self, bucket_tokens: int = 128, default_tokens: int = 256) -> None:
        self.bucket_tokens = bucket_tokens
        self.default_tokens = default_tokens
        self.histograms: dict[tuple[str, str], Counter[int]] = {}
        # (model, tenant) pairs asked about, so a shared history can be fetched for them.
        self.wanted: set[tuple[str, str]] = set()
        self.predictions = 0
        self.correct = 0

    def bucket_of(self, tokens: int) -> int:
        return max(tokens - 1, 0) // self.bucket_tokens

    @property
    def accuracy(self) -> float:
        return self.correct / self.predictions if self.predictions else 0.0

    def predict(self, model: str, tenant: str, max_tokens: int = 0) -> Prediction:
        cap = self.bucket_of(max_tokens) if max_tokens > 0 else None
        if (model, tenant) not in self.wanted:
            self.wanted.update({(model, tenant), (model, "")})
        history = self.histograms.get((model, tenant))
        if history is None or sum(history.values()) < MIN_HISTORY:
            history = self.histograms.get((model, ""))  # the model's traffic as a whole
        if history is not None and sum(history.values()) >= MIN_HISTORY:
            folded: Counter[int] = Counter()
            for bucket, count in history.items():
                folded[bucket if cap is None else min(bucket, cap)] += count
            # Most likely bucket; ties go to the shorter one.
            bucket = min(folded, key=lambda b: (-folded[b], b))
            return Prediction(bucket, self._tokens(bucket, max_tokens), True)
        guess = min(max_tokens, self.default_tokens) if max_tokens > 0 else self.default_tokens
        bucket = self.bucket_of(guess)
        return Prediction(bucket, self._tokens(bucket, max_tokens), False)

    def _tokens(self, bucket: int, max_tokens: int) -> int:
        upper = (bucket + 1) * self.bucket_tokens
        return min(upper, max_tokens) if max_tokens > 0 else upper

    def observe(
        self, model: str, tenant: str, completion_tokens: int, max_tokens: int = 0
    ) -> tuple[Prediction, bool]:
        """Scores the prediction for a finished request, then adds it to the history."""
        prediction = self.predict(model, tenant, max_tokens)
        correct = prediction.bucket == self.bucket_of(completion_tokens)
        self.predictions += 1
        self.correct += int(correct)
        self.record(model, tenant, self.bucket_of(completion_tokens))
        return prediction, correct

    def record(self, model: str, tenant: str, bucket: int, count: int = 1) -> None:
        for key in {(model, tenant), (model, "")}:
            self.histograms.setdefault(key, Counter())[bucket] += count

    def replace_history(self, model: str, tenant: str, histogram: Counter[int]) -> None:
        self.histograms[(model, tenant)] = histogram
