"""What the engine streams back per request, step by step."""

from __future__ import annotations

from dataclasses import dataclass

from deepserve.errors import DeepServeError
from deepserve.flowserve.engine.request import RequestTimeline


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """The chosen token's log-probability and, when asked, the most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(slots=True)
class GenerationOutput:
    """New tokens and text of one request since its previous output, plus running totals."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    num_prompt_tokens: int
    # Prompt tokens served from the prefix cache (usage.cached_tokens).
    num_cached_tokens: int
    # Generated tokens so far, including new_token_ids.
    num_output_tokens: int
    # None while generating; then "stop", "length", "abort" or "error".
    finish_reason: str | None = None
    # The stop string or stop token id that ended generation, when one did.
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprobs] | None = None
    # Set with finish_reason "error"; AsyncEngine.generate raises it.
    error: DeepServeError | None = None
    # On the last output: when the request queued, ran its prompt chunks, got tokens (tracing).
    timeline: RequestTimeline | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
