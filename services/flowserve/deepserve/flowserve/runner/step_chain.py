"""Chained steps: the forward thread samples a step and feeds its tokens to the step queued behind.

With a step sampled by the engine thread, the device idles from the end of step N's forward
until N+1 is submitted: the engine thread wakes, samples, updates its requests and plans, and
the forward thread wakes again (0.6-0.75 ms a step on the 2-core host, bench/RESULTS.md). A
sampled submission runs the engine's sampler on the forward thread right after the forward,
and keeps the token ids it picked; a chained plan (StepPlan.fed_by_step) submitted behind it
gets those ids written over its placeholders, so step N+1 starts as soon as N's tokens exist.
vLLM's async scheduling does the same with the tokens on the device.

Only the forward thread touches a StepChain.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from deepserve.errors import FailedPrecondition
from deepserve.flowserve.engine.step_plan import StepPlan

T = TypeVar("T")

# The engine's sampler for one step: logits -> (the token id of each row, what the engine keeps).
StepSampler = Callable[[torch.Tensor], tuple[Sequence[int], T]]


def refuse_chained(plan: StepPlan) -> None:
    """For submissions that cannot feed placeholders (unsampled steps, worker processes)."""
    if plan.fed_by_step is not None:
        raise FailedPrecondition(
            f"step {plan.step_id} is chained behind step {plan.fed_by_step}; "
            "only a sampled submission on one device can feed it"
        )


class StepChain:
    """The token ids the last sampled step picked, for the chained plan queued behind it."""

    def __init__(self) -> None:
        self._step_id: int | None = None
        self._token_ids: Sequence[int] = ()

    def feed(self, plan: StepPlan) -> None:
        """Write the feeding step's sampled tokens over a chained plan's placeholders."""
        if plan.fed_by_step is None:
            return
        if plan.fed_by_step != self._step_id:
            raise FailedPrecondition(
                f"step {plan.step_id} is fed by step {plan.fed_by_step}, but the last sampled "
                f"step was {self._step_id}"
            )
        for seq in plan.sequences:
            if seq.sampled_row >= 0:
                seq.token_ids[-1] = self._token_ids[seq.sampled_row]

    def run(
        self, execute: Callable[[StepPlan], torch.Tensor], plan: StepPlan, sample: StepSampler[T]
    ) -> T:
        """Feed `plan`, run it, sample its logits and keep the tokens for the next plan."""
        self.feed(plan)
        self._step_id = None  # a failure below leaves nothing to feed from
        logits = execute(plan)
        token_ids, kept = sample(logits)
        if len(token_ids) != logits.shape[0]:
            raise RuntimeError(f"sampler gave {len(token_ids)} tokens for {logits.shape[0]} rows")
        self._step_id, self._token_ids = plan.step_id, token_ids
        return kept
