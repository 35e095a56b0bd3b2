"""Per-request sampling parameters and their validation (no torch: the gateway builds these).

Ranges follow the OpenAI API where it defines one; `n` is absent because the gateway fans a
request out into n engine requests.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Literal

from deepserve.errors import InvalidArgument
from deepserve.structured_output import StructuredOutput

MAX_STOP_STRINGS = 16  # OpenAI allows 4; more is harmless for us and some clients send more.
MAX_TOP_LOGPROBS = 20
_SEED_MIN = -(2**63)
_SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed's accepted range

FinishReason = Literal["stop", "length"]


@dataclass(slots=True)
class SamplingParams:
    """How to pick each next token of one request and when to stop."""

    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    # HF semantics: divides positive / multiplies negative logits of every token seen in the
    # prompt or the output so far.
    repetition_penalty: float = 1.0
    # OpenAI semantics: subtracted from the logits of tokens already in the output.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # None: generate until a stop condition or the model's context limit (the engine enforces it).
    max_tokens: int | None = None
    min_tokens: int = 0
    logprobs: bool = False
    top_logprobs: int = 0
    skip_special_tokens: bool = True
    # Structured outputs: the text must match this (a JSON schema, regex, choice or grammar);
    # the engine masks each sampled token with its grammar.
    structured_output: StructuredOutput | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif not isinstance(self.stop, list):
            self.stop = list(self.stop)
        if not isinstance(self.stop_token_ids, list):
            self.stop_token_ids = list(self.stop_token_ids)

    @property
    def is_greedy(self) -> bool:
        """Argmax sampling: temperature 0 or top_k 1 (no random draw, seed irrelevant)."""
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise InvalidArgument naming the first field out of range."""
        _check_number(self.temperature, "temperature", 0.0, 2.0)
        _check_number(self.top_p, "top_p", 0.0, 1.0)
        if self.top_p <= 0.0:
            raise InvalidArgument("must be greater than 0 and at most 1", field="top_p")
        _check_int(self.top_k, "top_k")
        if self.top_k < -1:
            raise InvalidArgument("must be -1 or 0 (off) or a positive integer", field="top_k")
        _check_number(self.min_p, "min_p", 0.0, 1.0)
        if self.seed is not None:
            _check_int(self.seed, "seed")
            if not _SEED_MIN <= self.seed <= _SEED_MAX:
                raise InvalidArgument("is out of the 64-bit range", field="seed")
        _check_number(self.repetition_penalty, "repetition_penalty", -math.inf, math.inf)
        if self.repetition_penalty <= 0.0:
            raise InvalidArgument("must be greater than 0", field="repetition_penalty")
        _check_number(self.presence_penalty, "presence_penalty", -2.0, 2.0)
        _check_number(self.frequency_penalty, "frequency_penalty", -2.0, 2.0)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidArgument(f"at most {MAX_STOP_STRINGS} stop strings", field="stop")
        for stop in self.stop:
            if not isinstance(stop, str) or not stop:
                raise InvalidArgument("stop strings must be non-empty strings", field="stop")
        for token_id in self.stop_token_ids:
            _check_int(token_id, "stop_token_ids")
            if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
                raise InvalidArgument(
                    f"token id {token_id} is outside the vocabulary", field="stop_token_ids"
                )
        if self.max_tokens is not None:
            _check_int(self.max_tokens, "max_tokens")
            if self.max_tokens < 1:
                raise InvalidArgument("must be at least 1", field="max_tokens")
        _check_int(self.min_tokens, "min_tokens")
        if self.min_tokens < 0:
            raise InvalidArgument("must not be negative", field="min_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidArgument("must not exceed max_tokens", field="min_tokens")
        _check_int(self.top_logprobs, "top_logprobs")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidArgument(f"must be between 0 and {MAX_TOP_LOGPROBS}", field="top_logprobs")
        if self.top_logprobs > 0 and not self.logprobs:
            raise InvalidArgument("requires logprobs to be true", field="top_logprobs")

    def blocks_stop_tokens(self, num_output_tokens: int) -> bool:
        """Whether EOS and stop token ids may not come next, with `num_output_tokens` out.

        min_tokens is the number of tokens generated before EOS or a stop token id may end
        generation (vLLM's meaning): the first `min_tokens` output tokens cannot be one, so the
        earliest such stop is output token min_tokens + 1. The sampler masks them while this
        holds; `check_stop` applies the same rule to tokens that arrive unmasked.
        """
        return num_output_tokens < self.min_tokens

    def check_stop(
        self,
        token_id: int,
        num_output_tokens: int,
        eos_token_ids: Collection[int],
        max_tokens: int | None = None,
    ) -> tuple[FinishReason, int | None] | None:
        """Whether generation ends after `token_id`, the num_output_tokens-th output token.

        Returns the finish reason and the stop token id that ended it (None for EOS and for
        length), or None to go on. `max_tokens` overrides self.max_tokens (the engine resolves
        an unset one from the context window). Token-level stops only; stop strings are the
        detokenizer's job.
        """
        if not self.blocks_stop_tokens(num_output_tokens - 1):
            if not self.ignore_eos and token_id in eos_token_ids:
                return "stop", None
            if token_id in self.stop_token_ids:
                return "stop", token_id
        limit = self.max_tokens if max_tokens is None else max_tokens
        if limit is not None and num_output_tokens >= limit:
            return "length", None
        return None

    def finish_reason(
        self, token_id: int, num_output_tokens: int, eos_token_ids: Collection[int]
    ) -> FinishReason | None:
        """The finish reason `check_stop` gives, without the stop token id."""
        stop = self.check_stop(token_id, num_output_tokens, eos_token_ids)
        return None if stop is None else stop[0]


def _check_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument("must be an integer", field=name)


def _check_number(value: object, name: str, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument("must be a number", field=name)
    if not math.isfinite(value):
        raise InvalidArgument("must be a finite number", field=name)
    if not low <= value <= high:
        raise InvalidArgument(f"must be between {low:g} and {high:g}", field=name)
