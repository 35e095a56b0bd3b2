"""Step planning: which requests run each step, with how many tokens, in which KV blocks.

(The literature calls this continuous batching; here a *batch* is a Batch API job, and what
the engine runs each step is a `StepPlan`.) Pure Python (no torch): it sees requests, token
counts and free blocks, and returns a `StepPlan`. Each step it plans, in order:
1. running requests that decode (one token each), oldest first, so a long prompt never stalls them;
2. running requests still in prefill (the next chunk of their prompt), oldest first;
3. waiting requests (new or preempted), highest priority first, then oldest first, after a
   prefix-cache lookup (running requests are never displaced by priority, so none starves).
   A prompt that fits only in part lets later prompts of its priority that fit whole go
   first, then takes the budget left: more requests get a first token from each step.
   A migrated request (resumed with output tokens another instance generated) is admitted like
   a preempted one: prompt + output tokens are computed, then it decodes on.
All of it under a per-step token budget (which a step may overrun by 1/32 to finish a prompt
whole rather than leave it a few tokens short) and a cap on running requests. When blocks run out,
the latest-arrived unplanned running request is preempted: its blocks are freed and it waits
again, to recompute prompt + generated tokens later (its cached full blocks usually survive).

Two states of a PD hand-off (KV computed on a prefill instance, decoded on another) hold
blocks outside the queues: WAITING_FOR_REMOTE_KV (decode side: blocks reserved, the prompt's
KV arriving) and FINISHED_HOLDING_KV (prefill side: finished, blocks kept until sent).

Planning depends on token *counts*, not values, so step N+1 can be planned while step N
runs: each sequence expecting a sampled token gets a placeholder, resolved by
`finalize_plan` once step N's tokens are known (the paper's asynchronous scheduling); then
`top_up` admits requests that arrived meanwhile into the budget the plan left.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from deepserve.errors import FailedPrecondition, InvalidArgument
from deepserve.flowserve.engine.request import (
    PLACEHOLDER_TOKEN_ID,
    STATUS_OF_FINISH,
    Request,
    RequestStatus,
)
from deepserve.flowserve.engine.step_plan import StepPlan, StepSequence
from deepserve.flowserve.kv_cache import BlockHash, KVCacheManager, PrefixMatch


@dataclass(frozen=True, slots=True)
class StepPlannerConfig:
    """Per-step limits of the step planner."""

    max_num_seqs: int = 64
    step_token_budget: int = 2048

    @property
    def finish_slack(self) -> int:
        """Tokens a step may run over its budget to finish a prompt whole (1/32 of the budget).

        A prompt cut short by a few tokens waits a whole further step for its first token: 32
        prompts of 256 tokens beside 8 decodes made 7 first tokens a step instead of 8."""
        return self.step_token_budget // 32

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0:
            raise ValueError("max_num_seqs must be positive")
        if self.step_token_budget <= 0:
            raise ValueError("step_token_budget must be positive")


# Normal finishes keep a hold_kv request's blocks (released after the hand-off).
_HOLDS_KV = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH})


def _arrival(request: Request) -> int:
    return request.arrival_seq


def _admission_order(request: Request) -> tuple[int, int]:
    return (-request.priority, request.arrival_seq)


class StepPlanner:
    """Waiting and running queues over a KV cache manager; produces one StepPlan per step."""

    def __init__(self, config: StepPlannerConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        # Waiting: by priority then arrival (admission order); running: by arrival (latest
        # arrival preempted first).
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        # The live requests of the queues (waiting or running).
        self.requests: dict[str, Request] = {}
        # PD hand-offs: blocks reserved for KV arriving (decode side) and blocks of finished
        # requests kept until sent (prefill side). Neither is in the queues.
        self.waiting_for_remote_kv: dict[str, Request] = {}
        self.holding_kv: dict[str, Request] = {}
        self._next_arrival = 0
        self._step_id = 0
        self.num_preemptions = 0
        # Whether the last plan preempted (top_up then adds nothing to it).
        self._preempted_in_plan = False
        # Requests the planner itself had to fail (they can never fit); the engine reports them.
        self._failed: list[Request] = []
        # Multi-LoRA: the device slot of a resident adapter (None: not on the device yet), and
        # how many distinct adapters the running batch may mix.
        self.adapter_slot_of: Callable[[str], int | None] = lambda _adapter: None
        self.max_loras = 0

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
        if self._in_use(request.request_id):
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
        if request.num_output_tokens >= request.max_tokens:
            raise InvalidArgument(
                f"{request.num_output_tokens} tokens were already generated; max_tokens is "
                f"{request.max_tokens}",
                field="output_token_ids",
            )
        request.arrival_seq = self._next_arrival
        self._next_arrival += 1
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        bisect.insort(self.waiting, request, key=_admission_order)

    def finish_request(
        self, request_id: str, status: RequestStatus, stop_reason: int | str | None = None
    ) -> Request | None:
        """End a live request or a remote-KV reservation (abort, stop string seen by the
        detokenizer, error) and free its blocks; None when there is none by that id."""
        request = self.requests.get(request_id)
        if request is not None:
            self._finish(request, status, stop_reason)
            return request
        request = self.waiting_for_remote_kv.pop(request_id, None)
        if request is not None:
            self.kv_cache.free(request)
            request.finish(status, stop_reason)
        return request

    def finish_all(self, status: RequestStatus) -> list[Request]:
        """End every request with `status` (the executor broke): reservations and live requests
        finish, held KV is released; returns those that finished."""
        for request_id in list(self.holding_kv):
            self.release_kv(request_id)
        finished = []
        for request_id in [*self.waiting_for_remote_kv, *self.requests]:
            request = self.finish_request(request_id, status)
            if request is not None:
                finished.append(request)
        return finished

    def take_failed(self) -> list[Request]:
        """Requests failed by the planner since the last call (each carries `error`)."""
        failed, self._failed = self._failed, []
        return failed

    # ----- PD hand-off, decode side ----------------------------------------------------------

    def reserve_remote_kv(self, request: Request) -> PrefixMatch | None:
        """Allocate blocks for a prompt whose KV another instance computes; None when short.

        The prompt's cached prefix here (`PrefixMatch`, device or host tier) is reused. The
        request waits in WAITING_FOR_REMOTE_KV, out of the queues, until `activate_remote_kv`.
        """
        if self._in_use(request.request_id):
            raise FailedPrecondition(f"request id {request.request_id!r} is already in use")
        num_prompt = request.num_prompt_tokens
        match = self.kv_cache.match_prefix(
            request.all_token_ids,
            block_hashes=request.block_hashes,
            max_cached_tokens=num_prompt,
            salt=request.cache_salt,
        )
        if not self.kv_cache.alloc(request, num_prompt - match.num_tokens, match):
            return None
        request.status = RequestStatus.WAITING_FOR_REMOTE_KV
        self.waiting_for_remote_kv[request.request_id] = request
        return match

    def activate_remote_kv(
        self, request_id: str, first_token_id: int, num_cached_tokens: int = 0
    ) -> Request | None:
        """The prompt's KV is in its blocks: the request joins the running queue with every
        prompt token computed and its first token; None when it was aborted meanwhile."""
        request = self.waiting_for_remote_kv.pop(request_id, None)
        if request is None:
            return None
        request.num_cached_tokens = num_cached_tokens
        request.arrival_seq = self._next_arrival
        self._next_arrival += 1
        request.status = RequestStatus.RUNNING
        request.num_computed_tokens = request.num_prompt_tokens
        self.requests[request_id] = request
        bisect.insort(self.running, request, key=_arrival)
        # Only now may other prompts match these blocks: their KV is final.
        self.kv_cache.cache_blocks(request, request.num_prompt_tokens)
        self.update_from_output({request_id: first_token_id})
        return request

    # ----- PD hand-off, prefill side ----------------------------------------------------------

    def holds_kv(self, request_id: str) -> bool:
        """Whether a finished hold_kv request still holds its blocks (FINISHED_HOLDING_KV)."""
        return request_id in self.holding_kv

    def release_kv(self, request_id: str) -> bool:
        """Free a held request's blocks (its full blocks stay in the prefix cache)."""
        request = self.holding_kv.pop(request_id, None)
        if request is None:
            return False
        self.kv_cache.free(request)
        return True

    @property
    def num_waiting_for_remote_kv(self) -> int:
        return len(self.waiting_for_remote_kv)

    @property
    def num_holding_kv(self) -> int:
        return len(self.holding_kv)

    # ----- one step ---------------------------------------------------------------------------

    def plan_step(self) -> StepPlan:
        """Pick this step's sequences; token ids of tokens still being sampled are placeholders."""
        self._step_id += 1
        plan = StepPlan(step_id=self._step_id)
        budget = self.config.step_token_budget
        # Spent at most once: finishing a prompt with it leaves the budget at or below 0.
        slack = self.config.finish_slack
        planned: set[str] = set()
        preempted = False

        # Decodes before prefill chunks; within each, oldest first.
        order = sorted(self.running, key=lambda r: (self._remaining(r) > 1, r.arrival_seq))
        for request in order:
            if budget <= 0:
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
            num_new = remaining if remaining <= budget + slack else min(remaining, budget)
            while not self.kv_cache.append(request, num_new):
                victim = max((r for r in self.running if r.request_id not in planned), key=_arrival)
                if (
                    victim is request
                    and len(self.running) == 1
                    and not self._blocks_held_outside_queues
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
            plan.sequences.append(self._sequence(request, num_new))
            planned.add(request.request_id)
            budget -= num_new

        # A preemption means blocks are short: admitting more would only thrash.
        self._preempted_in_plan = preempted
        if not preempted:
            self._admit_waiting(plan, budget)
        return plan

    def top_up(self, plan: StepPlan) -> bool:
        """Admit waiting requests into the budget a planned step leaves; True if any joined.

        A pipelined engine plans step N+1 while step N runs, so requests that arrive during
        step N miss that plan and would wait a whole further step for their first token (a
        burst reaching the engine over 40 ms ran a 467-token step beside five prompts left
        waiting, bench/RESULTS.md, issue #19). The engine calls this after step N, just before
        submitting N+1. Nothing joins a plan that preempted (blocks are short)."""
        if self._preempted_in_plan:
            return False
        before = len(plan.sequences)
        self._admit_waiting(plan, self.config.step_token_budget - plan.num_tokens)
        return len(plan.sequences) > before

    def _admit_waiting(self, plan: StepPlan, budget: int) -> None:
        """Move waiting requests into `plan` while `budget` (tokens) and the running cap allow.

        Adapter requests whose adapter is not on the device yet (or that would bring one
        adapter too many into the batch) are passed over; the rest keep their order. A prompt
        that fits the step only in part waits for the end of the scan: requests behind it of
        its priority whose prompts fit whole go first (each gets its first token from this
        step), and it then takes whatever budget is left, so it still advances every step and
        is first in line for the next."""
        slack = self.config.finish_slack
        index = 0
        deferred: Request | None = None
        while (
            index < len(self.waiting)
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            request = self.waiting[index]
            if request.num_pending_tokens:
                break  # preempted while its last token was in flight; wait for that token
            if deferred is not None and request.priority < deferred.priority:
                break
            if request.adapter_id and not self._adapter_admissible(request):
                index += 1
                continue
            match = self._match(request)
            needed = request.num_tokens - match.num_tokens
            if needed > budget + slack:
                if deferred is None:
                    deferred = request
                index += 1
                continue
            admitted = self._admit(plan, index, request, match, needed)
            if admitted is None:
                break
            if admitted:
                budget -= needed
            # Admitted or failed, it left the queue: the same index holds the next request.
        if deferred is not None and budget > 0 and len(self.running) < self.config.max_num_seqs:
            match = self._match(deferred)
            needed = min(deferred.num_tokens - match.num_tokens, budget)
            where = next(i for i, r in enumerate(self.waiting) if r is deferred)
            self._admit(plan, where, deferred, match, needed)

    def waiting_tokens_to_compute(self) -> int:
        """Prompt tokens the waiting requests would compute if admitted together: their cached
        prefixes are not counted, and a full block that several of them share counts once (the
        first step computes it once, see `_admit`)."""
        seen: set[BlockHash] = set()
        total = 0
        for request in self.waiting:
            match = self._match(request)
            total += request.num_tokens - match.num_tokens
            # The full blocks before the last token's (that one is always computed: its logits).
            shareable = (request.num_tokens - 1) // self.kv_cache.block_size
            matched = len(match.blocks) + len(match.host_entries)
            for block_hash in request.block_hashes[matched:shareable]:
                if block_hash in seen:
                    total -= self.kv_cache.block_size
                else:
                    seen.add(block_hash)
        return total

    def _match(self, request: Request) -> PrefixMatch:
        return self.kv_cache.match_prefix(
            request.all_token_ids,
            block_hashes=request.block_hashes,
            max_cached_tokens=request.num_tokens - 1,
            salt=request.cache_salt,
        )

    def _admit(
        self, plan: StepPlan, index: int, request: Request, match: PrefixMatch, num_new: int
    ) -> bool | None:
        """Move waiting[index] into the running queue with `num_new` tokens in this step.

        True: admitted. None: no blocks for it now (stop admitting). False: it can never fit
        and was failed (and removed from the waiting queue).
        """
        if not self.kv_cache.alloc(request, num_new, match):
            if not self.running and not self._blocks_held_outside_queues:
                self.waiting.pop(index)
                self._fail(request, "the KV cache is too small to hold this request")
                return False
            return None
        self.waiting.pop(index)
        request.status = RequestStatus.RUNNING
        request.num_computed_tokens = match.num_tokens
        if request.num_cached_tokens < 0:
            # Usage counts prompt tokens (a resumed request also matches its output).
            request.num_cached_tokens = min(match.num_tokens, request.num_prompt_tokens)
        bisect.insort(self.running, request, key=_arrival)
        plan.sequences.append(self._sequence(request, num_new))
        # The full blocks this step computes are matchable at once, so a request admitted
        # after it in this same step reuses them: every layer writes the whole step's KV
        # before any sequence attends. A burst sharing a system prompt computes it once.
        self.kv_cache.cache_blocks(request, match.num_tokens + num_new)
        return True

    def finalize_plan(self, plan: StepPlan) -> StepPlan:
        """Make a step plan ready to submit, once the previous step's tokens are known.

        Drops sequences of requests that finished or were aborted since planning (their
        blocks are already freed), writes sampled token ids over placeholders, and registers
        the full blocks this step computes in the prefix cache (only now: a dropped sequence
        never writes its blocks, so they must not become matchable).
        """
        kept: list[StepSequence] = []
        for seq in plan.sequences:
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
        plan.sequences = kept
        return plan

    def chain_plan(self, plan: StepPlan, feeder_step: int, feeder_rows: Mapping[str, int]) -> bool:
        """Make a plan ready to submit before the step in flight (`feeder_step`) is sampled.

        Possible when each placeholder is the last token of its sequence and the token that
        step samples for the same request (in row feeder_rows[request id]); the executor then
        writes it in. Nothing is dropped (a request the feeding step finishes wastes one row)
        and the prefix cache learns the plan's blocks later, in `cache_chained_blocks`, once
        their token ids are known. False leaves the plan as it was, for `finalize_plan`.
        """
        fed: list[tuple[StepSequence, int]] = []
        for seq in plan.sequences:
            if PLACEHOLDER_TOKEN_ID not in seq.token_ids:
                continue
            last = len(seq.token_ids) - 1
            request = self.requests.get(seq.request_id)
            row = feeder_rows.get(seq.request_id)
            if (
                request is None
                or row is None
                or seq.token_ids.index(PLACEHOLDER_TOKEN_ID) != last
                or seq.start_pos + last != request.num_tokens
            ):
                return False
            fed.append((seq, row))
        for seq, row in fed:
            seq.sampled_row = row
        plan.fed_by_step = feeder_step if fed else None
        return True

    def cache_chained_blocks(self, plan: StepPlan) -> None:
        """Register the full blocks a chained plan computes, now that the step that fed it has
        been sampled (requests that step finished are skipped: their blocks are freed)."""
        for seq in plan.sequences:
            request = self.requests.get(seq.request_id)
            if request is not None and request.status is RequestStatus.RUNNING:
                self.kv_cache.cache_blocks(request, seq.start_pos + len(seq.token_ids))

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
            stop = request.sampling_params.check_stop(
                token_id, request.num_output_tokens, request.eos_token_ids, request.max_tokens
            )
            if stop is not None:
                reason, stop_token_id = stop
                self._finish(request, STATUS_OF_FINISH[reason], stop_token_id)
                finished.append(request)
        return finished

    # ----- helpers ----------------------------------------------------------------------------

    def _adapter_admissible(self, request: Request) -> bool:
        slot = self.adapter_slot_of(request.adapter_id)
        if slot is None:
            return False
        active = {r.adapter_id for r in self.running if r.adapter_id}
        if request.adapter_id not in active and len(active) >= self.max_loras:
            return False
        request.adapter_slot = slot
        return True

    def adapter_slots_in_use(self) -> set[int]:
        """Slots a running request reads (or will read in a step planned already)."""
        return {r.adapter_slot for r in self.running if r.adapter_id}

    def _in_use(self, request_id: str) -> bool:
        return (
            request_id in self.requests
            or request_id in self.waiting_for_remote_kv
            or request_id in self.holding_kv
        )

    @property
    def _blocks_held_outside_queues(self) -> bool:
        # While hand-offs hold blocks, a request that cannot grow waits for them to go instead
        # of failing.
        return bool(self.waiting_for_remote_kv or self.holding_kv)

    @staticmethod
    def _remaining(request: Request) -> int:
        return request.num_tokens_with_pending - request.num_computed_tokens

    def _sequence(self, request: Request, num_new: int) -> StepSequence:
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
        return StepSequence(
            request_id=request.request_id,
            token_ids=token_ids,
            start_pos=start,
            block_table=self.kv_cache.block_ids(request.request_id)[:num_blocks],
            needs_logits=needs_logits,
            adapter_slot=request.adapter_slot if request.adapter_id else -1,
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
        self.requests.pop(request.request_id, None)
        request.finish(status, stop_reason)
        if request.hold_kv and status in _HOLDS_KV and self.kv_cache.holds(request.request_id):
            request.status = RequestStatus.FINISHED_HOLDING_KV
            self.holding_kv[request.request_id] = request
        else:
            self.kv_cache.free(request)
