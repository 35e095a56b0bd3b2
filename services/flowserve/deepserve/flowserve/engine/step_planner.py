"""Continuous batching: which requests run each step, with how many tokens, in which KV blocks.

Pure Python (no torch): it sees requests, token counts and free blocks, and returns a
`ScheduledBatch`. Each step it schedules, in order:
1. running requests that decode (one token each), oldest first, so a long prompt never stalls them;
2. running requests still in prefill (the next chunk of their prompt), oldest first;
3. waiting requests (new or preempted), highest priority first, then oldest first, after a
   prefix-cache lookup (running requests are never displaced by priority, so none starves).
All of it under a per-step token budget and a cap on running requests. When blocks run out,
the latest-arrived unscheduled running request is preempted: its blocks are freed and it waits
again, to recompute prompt + generated tokens later (its cached full blocks usually survive).

Scheduling depends on token *counts*, not values, so step N+1 can be scheduled while step N
runs: each sequence expecting a sampled token gets a placeholder, resolved by
`finalize_batch` once step N's tokens are known (the paper's asynchronous scheduling).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from deepserve.errors import InvalidArgument
from deepserve.flowserve.engine.request import PLACEHOLDER_TOKEN_ID, Request, RequestStatus
from deepserve.flowserve.engine.step_plan import ScheduledBatch, ScheduledSequence
from deepserve.flowserve.kv_cache import KVCacheManager


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Per-step limits of the scheduler."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0:
            raise ValueError("max_num_seqs must be positive")
        if self.max_num_batched_tokens <= 0:
            raise ValueError("max_num_batched_tokens must be positive")


# Normal finishes keep a hold_kv request's blocks (the engine releases them after hand-off).
_HOLDS_KV = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH})


def _arrival(request: Request) -> int:
    return request.arrival_seq


def _admission_order(request: Request) -> tuple[int, int]:
    return (-request.priority, request.arrival_seq)


class Scheduler:
    """Waiting and running queues over a KV cache manager; produces one batch per step."""

    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        # Waiting: by priority then arrival (admission order); running: by arrival (latest
        # arrival preempted first).
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._next_arrival = 0
        self._step_id = 0
        self.num_preemptions = 0
        # Requests the scheduler itself had to fail (they can never fit); the engine reports them.
        self._failed: list[Request] = []
        # How many requests outside the queues hold blocks (KV hand-offs in progress): while
        # any do, a request that cannot grow waits for them instead of failing.
        self.blocks_held_elsewhere: Callable[[], int] = lambda: 0

    # ----- queue management -------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    def add_request(self, request: Request) -> None:
        """Queue a request; raises InvalidArgument if it could never fit the whole KV cache."""
        if request.request_id in self.requests:
            raise InvalidArgument(
                f"request id {request.request_id!r} is already in use", field="request_id"
            )
        capacity = self.kv_cache.pool.num_blocks * self.kv_cache.block_size
        if request.num_prompt_tokens > capacity:
            raise InvalidArgument(
                f"prompt of {request.num_prompt_tokens} tokens exceeds the KV cache of "
                f"{capacity} tokens",
                field="prompt_token_ids",
            )
        if request.num_prompt_tokens + request.max_tokens > capacity:
            raise InvalidArgument(
                f"prompt ({request.num_prompt_tokens}) + max_tokens ({request.max_tokens}) "
                f"exceeds the KV cache of {capacity} tokens",
                field="max_tokens",
            )
        request.arrival_seq = self._next_arrival
        self._next_arrival += 1
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        bisect.insort(self.waiting, request, key=_admission_order)

    def add_prefilled(self, request: Request) -> None:
        """Admit a request whose prompt KV already sits in its blocks (sent by a prefill instance).

        The blocks were allocated with `kv_cache.alloc` for the whole prompt; the request joins
        the running queue with every prompt token computed, so its next step is a decode.
        """
        if request.request_id in self.requests:
            raise InvalidArgument(
                f"request id {request.request_id!r} is already in use", field="request_id"
            )
        if not self.kv_cache.holds(request.request_id):
            raise ValueError(f"request {request.request_id} holds no KV blocks")
        request.arrival_seq = self._next_arrival
        self._next_arrival += 1
        request.status = RequestStatus.RUNNING
        request.num_computed_tokens = request.num_prompt_tokens
        self.requests[request.request_id] = request
        bisect.insort(self.running, request, key=_arrival)

    def finish_request(
        self, request_id: str, status: RequestStatus, stop_reason: int | str | None = None
    ) -> Request | None:
        """End a live request (abort, stop string seen by the detokenizer) and free its blocks."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        self._finish(request, status, stop_reason)
        return request

    def take_failed(self) -> list[Request]:
        """Requests failed by the scheduler since the last call (each carries `error`)."""
        failed, self._failed = self._failed, []
        return failed

    # ----- one step ---------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        """Pick this step's sequences; token ids of tokens still being sampled are placeholders."""
        self._step_id += 1
        batch = ScheduledBatch(step_id=self._step_id)
        budget = self.config.max_num_batched_tokens
        scheduled: set[str] = set()
        preempted = False

        # Decodes before prefill chunks; within each, oldest first.
        order = sorted(self.running, key=lambda r: (self._remaining(r) > 1, r.arrival_seq))
        for request in order:
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            remaining = self._remaining(request)
            if remaining <= 0:
                continue
            if (
                request.num_pending_tokens
                and request.num_output_tokens + request.num_pending_tokens >= request.max_tokens
            ):
                continue  # the token in flight ends it on length: no slot to waste
            num_new = min(remaining, budget)
            while not self.kv_cache.append(request, num_new):
                victim = max(
                    (r for r in self.running if r.request_id not in scheduled), key=_arrival
                )
                if (
                    victim is request
                    and len(self.running) == 1
                    and not self.blocks_held_elsewhere()
                ):
                    # Nothing else holds blocks: it can never grow; fail instead of looping.
                    self._fail(request, "the KV cache is too small to hold this request")
                    break
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                continue
            batch.sequences.append(self._emit(request, num_new))
            scheduled.add(request.request_id)
            budget -= num_new

        # A preemption means blocks are short: admitting more would only thrash.
        while (
            not preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            request = self.waiting[0]
            if request.num_pending_tokens:
                break  # preempted while its last token was in flight; wait for that token
            match = self.kv_cache.match_prefix(
                request.all_token_ids,
                block_hashes=request.block_hashes,
                max_cached_tokens=request.num_tokens - 1,
            )
            num_new = min(request.num_tokens - match.num_tokens, budget)
            if not self.kv_cache.alloc(request, num_new, match):
                if not self.running and not self.blocks_held_elsewhere():
                    self.waiting.pop(0)
                    self._fail(request, "the KV cache is too small to hold this request")
                    continue
                break
            self.waiting.pop(0)
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = match.num_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = match.num_tokens
            bisect.insort(self.running, request, key=_arrival)
            batch.sequences.append(self._emit(request, num_new))
            budget -= num_new
        return batch

    def finalize_batch(self, batch: ScheduledBatch) -> ScheduledBatch:
        """Make a scheduled batch ready to submit, once the previous step's tokens are known.

        Drops sequences of requests that finished or were aborted since scheduling (their
        blocks are already freed), writes sampled token ids over placeholders, and registers
        the full blocks this step computes in the prefix cache (only now: a dropped sequence
        never writes its blocks, so they must not become matchable).
        """
        kept: list[ScheduledSequence] = []
        for seq in batch.sequences:
            request = self.requests.get(seq.request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue
            for i, token_id in enumerate(seq.token_ids):
                if token_id == PLACEHOLDER_TOKEN_ID:
                    pos = seq.start_pos + i
                    if pos >= request.num_tokens:
                        raise RuntimeError(
                            f"token {pos} of {seq.request_id} is not sampled yet; "
                            "process the previous step before finalizing"
                        )
                    seq.token_ids[i] = request.all_token_ids[pos]
            self.kv_cache.cache_blocks(request, seq.start_pos + len(seq.token_ids))
            kept.append(seq)
        batch.sequences = kept
        return batch

    def update_from_output(self, sampled: Mapping[str, int]) -> list[Request]:
        """Append each request's sampled token; returns the requests that finished by it."""
        finished: list[Request] = []
        for request_id, token_id in sampled.items():
            request = self.requests.get(request_id)
            if request is None:
                continue  # finished or aborted after its step was submitted
            if request.num_pending_tokens > 0:
                request.num_pending_tokens -= 1
            request.append_output_token(token_id)
            status, stop_reason = self._check_stop(request, token_id)
            if status is not None:
                self._finish(request, status, stop_reason)
                finished.append(request)
        return finished

    # ----- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _remaining(request: Request) -> int:
        return request.num_tokens_with_pending - request.num_computed_tokens

    def _emit(self, request: Request, num_new: int) -> ScheduledSequence:
        start = request.num_computed_tokens
        end = start + num_new
        known = request.all_token_ids
        token_ids = list(known[start : min(end, len(known))])
        token_ids.extend([PLACEHOLDER_TOKEN_ID] * (end - start - len(token_ids)))
        needs_logits = end == request.num_tokens_with_pending
        if needs_logits:
            request.num_pending_tokens += 1
        request.num_computed_tokens = end
        num_blocks = -(-end // self.kv_cache.block_size)
        return ScheduledSequence(
            request_id=request.request_id,
            token_ids=token_ids,
            start_pos=start,
            block_table=self.kv_cache.block_ids(request.request_id)[:num_blocks],
            needs_logits=needs_logits,
        )

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv_cache.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, request, key=_admission_order)

    def _fail(self, request: Request, message: str) -> None:
        request.error = message
        self._finish(request, RequestStatus.FINISHED_ERROR)
        self._failed.append(request)

    def _finish(
        self, request: Request, status: RequestStatus, stop_reason: int | str | None = None
    ) -> None:
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        request.stop_reason = stop_reason
        if not (request.hold_kv and status in _HOLDS_KV):
            self.kv_cache.free(request)
        self.requests.pop(request.request_id, None)

    @staticmethod
    def _check_stop(request: Request, token_id: int) -> tuple[RequestStatus | None, int | None]:
        if request.num_output_tokens > request.min_tokens:
            if not request.ignore_eos and token_id in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED, None
            if token_id in request.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED, token_id
        if request.num_output_tokens >= request.max_tokens:
            return RequestStatus.FINISHED_LENGTH, None
        return None, None
