"""Per-request sampling state across steps: one SamplingState per live request, fed to the Sampler."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol

import torch

from deepserve.flowserve.sampling.sampler import Sampler, SampleResult
from deepserve.flowserve.sampling.state import SamplingState
from deepserve.sampling_params import SamplingParams


class SampledRequest(Protocol):
    """What the sampler reads of a request (deepserve.flowserve.engine.request.Request)."""

    @property
    def request_id(self) -> str: ...

    @property
    def sampling_params(self) -> SamplingParams: ...

    @property
    def prompt_token_ids(self) -> list[int]: ...

    @property
    def output_token_ids(self) -> list[int]: ...

    @property
    def eos_token_ids(self) -> Collection[int]: ...


class RequestSampler:
    """Keeps each request's SamplingState (params, output history, seeded RNG) for the Sampler."""

    def __init__(self, sampler: Sampler | None = None) -> None:
        self._sampler = sampler or Sampler()
        self._states: dict[str, SamplingState] = {}

    def sample(
        self, logits: torch.Tensor, requests: Sequence[SampledRequest]
    ) -> list[SampleResult]:
        """One token per logits row; row i belongs to requests[i]."""
        return self._sampler.sample(logits, [self._state(r) for r in requests])

    def release(self, request_id: str) -> None:
        """Forget a finished request's state."""
        self._states.pop(request_id, None)

    def _state(self, request: SampledRequest) -> SamplingState:
        state = self._states.get(request.request_id)
        if state is None:
            state = SamplingState(
                params=request.sampling_params,
                prompt_token_ids=request.prompt_token_ids,
                # The request's own list: penalties always see the current output.
                output_token_ids=request.output_token_ids,
                eos_token_ids=tuple(request.eos_token_ids),
            )
            self._states[request.request_id] = state
        return state
