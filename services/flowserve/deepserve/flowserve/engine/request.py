"""One generation request as the engine core tracks it: tokens, progress, status."""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from deepserve.flowserve.sampling.grammar import GrammarState
from deepserve.prefix_hash import BlockHash
from deepserve.sampling_params import FinishReason, SamplingParams

# Stands in for a token sampled by the step still running on the device; the engine writes
# the real id into the step plan just before submitting it (asynchronous scheduling).
PLACEHOLDER_TOKEN_ID = -1


class RequestStatus(enum.Enum):
    """Where a request is in its life; the FINISHED_* states are terminal."""

    WAITING = "waiting"
    # Decode side of a PD hand-off: its blocks are reserved and the prompt's KV is arriving
    # from a prefill instance; it runs once that instance reports the first token.
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"
    # Prefill side of a PD hand-off: it finished normally (`Request.finish_reason` says how)
    # and keeps its KV blocks until the decode instance has them.
    FINISHED_HOLDING_KV = "holding_kv"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
    RequestStatus.FINISHED_ERROR,
    RequestStatus.FINISHED_HOLDING_KV,
}

# The OpenAI-style finish reason each way of finishing reports.
FINISH_REASONS: dict[RequestStatus, str] = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}
STATUS_OF_FINISH: dict[FinishReason, RequestStatus] = {
    "stop": RequestStatus.FINISHED_STOPPED,
    "length": RequestStatus.FINISHED_LENGTH,
}


@dataclass(slots=True)
class RequestTimeline:
    """Wall-clock marks (ns since the epoch) of one request's life in the engine, for tracing."""

    arrived_ns: int = field(default_factory=time.time_ns)
    first_scheduled_ns: int | None = None
    # (start, end, tokens) of each prompt chunk computed.
    prefill_chunks: list[tuple[int, int, int]] = field(default_factory=list)
    first_token_ns: int | None = None
    finished_ns: int | None = None
    # (start, end) of reading the request's LoRA adapter from storage, when it had to.
    adapter_load: tuple[int, int] | None = None


@dataclass(eq=False)
class Request:
    """A prompt, its generated tokens so far, and how much of it has KV on the device."""

    request_id: str
    prompt_token_ids: list[int]
    # Resolved by the engine: the request's own limit, else what the context window leaves.
    max_tokens: int
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    # The model's end-of-sequence ids (the engine fills them in when empty).
    eos_token_ids: frozenset[int] = frozenset()
    # Arrival order; preemption picks the latest arrival, the waiting queue honours it.
    arrival_seq: int = 0
    # Higher is admitted from the waiting queue first (batch jobs use negative priorities).
    priority: int = 0
    # Keep the KV blocks after a normal finish until released (a prefill instance hands them
    # to a decode instance first); aborted or failed requests free them as usual.
    hold_kv: bool = False
    # Enters the block hash chain: prompts with different salts never share cached blocks.
    cache_salt: str = ""
    # Structured outputs: the matcher of the request's grammar (it follows output_token_ids).
    grammar: GrammarState | None = None
    # A LoRA adapter: its id, its host weights (opaque here) and, once admitted, its slot.
    adapter_id: str = ""
    adapter_weights: object | None = None
    adapter_slot: int = -1

    # Generated tokens. Given at construction, they are a migrated request's tokens generated
    # (and streamed) by an instance that died: the request resumes after them.
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    # "stop", "length", "abort" or "error" once finished (kept while it holds its KV).
    finish_reason: str | None = None
    # Tokens whose KV is computed or scheduled to be (advanced when a step is scheduled).
    num_computed_tokens: int = 0
    # Tokens being sampled by steps not yet processed (at most one per step in flight).
    num_pending_tokens: int = 0
    # Prompt tokens served from the prefix cache at first admission (for usage accounting).
    num_cached_tokens: int = -1
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    error: str | None = None
    block_hashes: list[BlockHash] = field(default_factory=list)
    timeline: RequestTimeline = field(default_factory=RequestTimeline)
    # Output tokens the request arrived with (resumed, never sampled or streamed here).
    num_resumed_tokens: int = field(init=False, default=0)
    _all_token_ids: list[int] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        self.output_token_ids = list(self.output_token_ids)
        self.num_resumed_tokens = len(self.output_token_ids)
        self._all_token_ids = [*self.prompt_token_ids, *self.output_token_ids]

    @property
    def all_token_ids(self) -> Sequence[int]:
        """Prompt then generated tokens (all known ones; a recompute after preemption uses all)."""
        return self._all_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Known tokens (prompt + sampled so far)."""
        return len(self._all_token_ids)

    @property
    def num_tokens_with_pending(self) -> int:
        return len(self._all_token_ids) + self.num_pending_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)

    def finish(self, status: RequestStatus, stop_reason: int | str | None = None) -> None:
        """Enter a terminal status and record its finish reason."""
        self.status = status
        self.finish_reason = FINISH_REASONS[status]
        self.stop_reason = stop_reason

    def stop_on_string(self, stop: str) -> None:
        """A stop string matched the text of the newest token: the request ends with "stop",
        even when the same token already ended it on length."""
        self.finish_reason = "stop"
        self.stop_reason = stop
        if self.status is RequestStatus.FINISHED_LENGTH:
            self.status = RequestStatus.FINISHED_STOPPED
