"""Each step's sampled tokens -> GenerationOutputs: text deltas, stop strings, finishing.

The engine core hands every sampled token here. Its request's detokenizer turns it into a text
delta, holding back text that may still become a stop string; a matched stop string ends the
request (the step planner frees or, for a hand-off, keeps its blocks). The output carries the
running totals, logprobs and, on the last one, the request's timeline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from deepserve.errors import DeepServeError
from deepserve.flowserve.engine.outputs import GenerationOutput, TokenLogprobs
from deepserve.flowserve.engine.request import Request, RequestStatus
from deepserve.flowserve.engine.step_planner import StepPlanner
from deepserve.flowserve.sampling.sampler import SampleResult


class Detokenizer(Protocol):
    """deepserve.flowserve.engine.detokenizer.IncrementalDetokenizer's interface."""

    stop_match: str | None

    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


DetokenizerFactory = Callable[[Request], Detokenizer | None]


def detokenizer_factory_for(tokenizer: Any) -> DetokenizerFactory:
    """Per-request IncrementalDetokenizers over one tokenizer, honouring stop strings."""
    from deepserve.flowserve.engine.detokenizer import IncrementalDetokenizer

    def make(request: Request) -> Detokenizer:
        params = request.sampling_params
        return IncrementalDetokenizer(
            tokenizer,
            request.prompt_token_ids,
            skip_special_tokens=params.skip_special_tokens,
            stop=params.stop,
        )

    return make


class OutputProcessor:
    """Keeps each live request's detokenizer and builds its outputs, token by token."""

    def __init__(
        self, planner: StepPlanner, detokenizer_factory: DetokenizerFactory | None = None
    ) -> None:
        self._planner = planner
        self._detokenizer_factory = detokenizer_factory
        self._detokenizers: dict[str, Detokenizer] = {}

    def add_request(self, request: Request) -> None:
        """Start the request's text stream (before its first token).

        A migrated request's detokenizer first replays the tokens it resumes with, dropping
        their text (the client has it): what it held back (a partial UTF-8 character, the start
        of a possible stop string) is held back here too, so the text continues exactly.
        """
        if self._detokenizer_factory is None:
            return
        detokenizer = self._detokenizer_factory(request)
        if detokenizer is not None:
            for token_id in request.output_token_ids[: request.num_resumed_tokens]:
                detokenizer.push(token_id)
            self._detokenizers[request.request_id] = detokenizer

    def token_output(self, request: Request, result: SampleResult) -> GenerationOutput:
        """The output for one sampled token (already appended to the request by the planner)."""
        text = ""
        detokenizer = self._detokenizers.get(request.request_id)
        if detokenizer is not None:
            text = detokenizer.push(result.token_id)
            stop = detokenizer.stop_match
            if stop is not None:
                if request.is_finished:
                    request.stop_on_string(stop)
                else:
                    self._planner.finish_request(
                        request.request_id, RequestStatus.FINISHED_STOPPED, stop_reason=stop
                    )
            elif request.is_finished:
                text += detokenizer.flush()
        if request.is_finished:
            self._detokenizers.pop(request.request_id, None)
        return _output(request, [result.token_id], text, result)

    def final_output(
        self, request: Request, error: DeepServeError | None = None
    ) -> GenerationOutput:
        """The last output of a request that ended without a new token (abort, failure)."""
        self._detokenizers.pop(request.request_id, None)
        return _output(request, [], "", None, error=error)


def _output(
    request: Request,
    token_ids: list[int],
    text: str,
    result: SampleResult | None,
    *,
    error: DeepServeError | None = None,
) -> GenerationOutput:
    logprobs = None
    if result is not None and result.logprob is not None:
        top = tuple(result.top_logprobs or ())
        logprobs = [TokenLogprobs(result.token_id, result.logprob, top)]
    timeline = request.timeline
    if token_ids and timeline.first_token_ns is None:
        timeline.first_token_ns = time.time_ns()
    if request.is_finished and timeline.finished_ns is None:
        timeline.finished_ns = time.time_ns()
    return GenerationOutput(
        request_id=request.request_id,
        new_token_ids=token_ids,
        new_text=text,
        num_prompt_tokens=request.num_prompt_tokens,
        num_cached_tokens=max(request.num_cached_tokens, 0),
        num_output_tokens=request.num_output_tokens,
        finish_reason=request.finish_reason,
        stop_reason=request.stop_reason,
        logprobs=logprobs,
        error=error,
        timeline=timeline if request.is_finished else None,
    )
