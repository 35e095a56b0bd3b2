"""How long an idle engine holds its first step so that a burst of requests starts together.

Requests sent at once reach the engine a few milliseconds apart (each crosses the gateway and
the scheduler on its own). An idle engine used to start a step with the first alone; the rest
then waited for that whole prefill before theirs began: 8 x 256-token prompts arriving within
13 ms ran as a 256-token step (0.38 s) and then a 1792-token one, so 7 of 8 first tokens came
0.4 s late (bench/RESULTS.md, issue #19). Holding the first step for a small fraction of its own
expected duration lets the burst join it, and costs a request that arrives alone at most that
fraction of its time to first token. Pure Python: the async engine asks, the core reports steps.
"""

from __future__ import annotations

from dataclasses import dataclass

# Steps of fewer tokens say little about prefill speed (fixed per-step costs dominate).
_MIN_TOKENS_TO_LEARN = 64


@dataclass(slots=True)
class AdmissionWindow:
    """Hold = min(max_s, fraction x expected prefill time of what is waiting)."""

    fraction: float = 0.05
    max_s: float = 0.025
    # Seconds per computed token, a moving average over large steps (None: none seen yet).
    seconds_per_token: float | None = None

    def note_step(self, tokens: int, seconds: float) -> None:
        """A finished step's size and duration (prefill-sized steps teach the estimate)."""
        if tokens < _MIN_TOKENS_TO_LEARN or seconds <= 0:
            return
        sample = seconds / tokens
        if self.seconds_per_token is None:
            self.seconds_per_token = sample
        else:
            self.seconds_per_token += 0.2 * (sample - self.seconds_per_token)

    def hold_s(self, waiting_prompt_tokens: int, step_token_budget: int) -> float:
        """Seconds to hold the first step of an idle engine; 0 when the step is already full,
        nothing waits, or no step has been timed yet."""
        if (
            self.fraction <= 0
            or self.seconds_per_token is None
            or waiting_prompt_tokens <= 0
            or waiting_prompt_tokens >= step_token_budget
        ):
            return 0.0
        return min(self.max_s, self.fraction * waiting_prompt_tokens * self.seconds_per_token)
