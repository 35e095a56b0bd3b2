"""Per-request sampling state across steps: one SamplingState per live request, fed to the Sampler."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
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

    def bind(
        self, requests: Sequence[SampledRequest]
    ) -> Callable[[torch.Tensor], tuple[list[int], list[SampleResult]]]:
        """The sampling of one step's rows as a function of its logits, to run on another thread
        (the executor's forward thread): the states are looked up now, on the caller's thread,
        and the function returns the token ids beside the results."""
        states = [self._state(r) for r in requests]
        sampler = self._sampler

        def sample(logits: torch.Tensor) -> tuple[list[int], list[SampleResult]]:
            results = sampler.sample(logits, states)
            return [r.token_id for r in results], results

        return sample

    @staticmethod
    def reads_no_history(request: SampledRequest) -> bool:
        """Whether sampling the request's next token reads none of its output so far, so it can
        be sampled before the token ahead of it is appended (a chained step): no penalties,
        and min_tokens already reached (that only stays true as the output grows)."""
        params = request.sampling_params
        return not params.has_penalties and not params.blocks_stop_tokens(
            len(request.output_token_ids)
        )

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
