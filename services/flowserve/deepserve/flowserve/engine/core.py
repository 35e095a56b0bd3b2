"""The engine's step loop: schedule -> execute -> sample -> update, on one thread, no asyncio.

Each step the step planner says what runs (a StepPlan), the executor runs it, the request
sampler picks one token per logits row, the planner appends the tokens (and finishes requests
on EOS, stop ids or length), and the output processor turns them into outputs.

With asynchronous scheduling a step is pipelined: step N+1 is planned while step N runs on
the device (planning needs token counts only), then N's logits are sampled, the tokens written
into N+1's placeholders, and N+1 submitted; text deltas for N are produced while N+1 runs.
Sequences that turned out finished at N are dropped from N+1 before it is submitted, and a stop
string found after submission only wastes that request's slot in N+1.

Chained steps go one further where the executor can sample on its forward thread
(runner/step_chain.py): N+1 is submitted before N is sampled, and the forward thread writes
N's tokens into it and starts it the moment they exist, so the device does not wait for this
thread between decode steps. A chained step keeps the requests N finishes (each wastes a row)
and takes no requests that arrive while N runs; so only decode-only steps are chained behind
(short, and requests arriving meanwhile wait one short step more), and only rows whose
sampling reads nothing N changes (no grammar, penalties or pending min_tokens).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from deepserve.errors import Cancelled, DeepServeError, FailedPrecondition, ResourceExhausted
from deepserve.flowserve.engine.adapter_slots import AdapterSlotTable
from deepserve.flowserve.engine.admission_window import AdmissionWindow
from deepserve.flowserve.engine.config import EngineConfig
from deepserve.flowserve.engine.kv_handoff import KVReservation
from deepserve.flowserve.engine.output_processor import DetokenizerFactory, OutputProcessor
from deepserve.flowserve.engine.outputs import GenerationOutput
from deepserve.flowserve.engine.request import Request, RequestStatus
from deepserve.flowserve.engine.stats import EngineStats, ThroughputMeter
from deepserve.flowserve.engine.step_plan import StepPlan
from deepserve.flowserve.engine.step_planner import StepPlanner, StepPlannerConfig
from deepserve.flowserve.kv_cache import HostTransport, KVCacheManager, KVEventListener
from deepserve.flowserve.sampling.grammar import (
    GrammarCompiler,
    TokenBitmask,
    apply_token_bitmask,
    compute_bitmask,
)
from deepserve.flowserve.sampling.request_sampler import RequestSampler
from deepserve.flowserve.sampling.sampler import Sampler, SampleResult

T = TypeVar("T")


class StepExecutor(Protocol):
    """The part of deepserve.flowserve.runner.executor.Executor the engine core drives."""

    def submit(self, plan: StepPlan) -> Future[torch.Tensor]: ...

    def execute(self, plan: StepPlan) -> torch.Tensor: ...


class SubmitSampled(Protocol):
    """`submit_sampled` of an executor that samples on its forward thread and runs chained
    plans (deepserve.flowserve.runner.executor.UniprocExecutor, runner/step_chain.py)."""

    def __call__(
        self, plan: StepPlan, sample: Callable[[torch.Tensor], tuple[list[int], T]]
    ) -> Future[T]: ...


@dataclass(slots=True)
class _InFlight:
    """The submitted step: its plan, the request behind each logits row, and its future:
    logits, or (sampled on the forward thread) the rows' SampleResults. `mask` holds the
    grammar masks of a logits step's constrained rows, computed while it runs."""

    plan: StepPlan
    rows: list[Request]
    future: Future[Any]
    sampled: bool
    started_ns: int
    mask: TokenBitmask | None = None


def _require(executor: Any, method: str) -> Callable[..., Any]:
    fn = getattr(executor, method, None)
    if not callable(fn):
        raise FailedPrecondition(f"this executor cannot {method} (no KV hand-off)")
    return fn


class EngineCore:
    """Runs one step at a time over the step planner, KV cache, executor, sampler and output
    processor; PD hand-offs are request states the planner keeps.

    Not thread-safe: every call comes from the engine thread (see AsyncEngine).
    """

    def __init__(
        self,
        config: EngineConfig,
        executor: StepExecutor,
        *,
        sampler: Sampler | None = None,
        eos_token_ids: Collection[int] = (),
        detokenizer_factory: DetokenizerFactory | None = None,
        host_transport: HostTransport | None = None,
        kv_event_listener: KVEventListener | None = None,
        on_dequeued: Callable[[str], None] | None = None,
        grammar_compiler: GrammarCompiler | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.executor = executor
        num_blocks = config.num_gpu_blocks
        executor_blocks = getattr(executor, "num_blocks", None)
        if num_blocks is None:
            # The executor was built first, from the memory budget: its block count is the truth.
            num_blocks = (
                executor_blocks if executor_blocks is not None else config.resolve_num_gpu_blocks()
            )
        elif executor_blocks is not None and executor_blocks != num_blocks:
            raise ValueError(f"num_gpu_blocks={num_blocks} but the executor has {executor_blocks}")
        if config.num_host_blocks > 0 and host_transport is None:
            raise ValueError("num_host_blocks > 0 needs a host_transport")
        self.kv_cache = KVCacheManager(
            num_blocks,
            config.block_size,
            enable_prefix_caching=config.enable_prefix_caching,
            num_host_blocks=config.num_host_blocks,
            host_transport=host_transport,
            event_listener=kv_event_listener,
        )
        self.planner = StepPlanner(
            StepPlannerConfig(config.max_num_seqs, config.step_token_budget), self.kv_cache
        )
        self.adapter_slots = AdapterSlotTable(config.lora_slots)
        self.planner.adapter_slot_of = self._adapter_slot
        self.planner.max_loras = config.max_loras
        self.eos_token_ids = frozenset(eos_token_ids)
        self._sampler = RequestSampler(sampler)
        self._outputs = OutputProcessor(self.planner, detokenizer_factory)
        self._on_dequeued = on_dequeued
        self.grammar_compiler = grammar_compiler
        self._unstarted: set[str] = set()
        self._in_flight: _InFlight | None = None
        # Sampling on the executor's forward thread, and chained steps (module docstring); None
        # where the executor cannot or chain_steps is off.
        self._submit_sampled: SubmitSampled | None = (
            getattr(executor, "submit_sampled", None) if config.chain_steps else None
        )
        self._generated = ThroughputMeter()
        self._computed = ThroughputMeter()
        self.admission_window = AdmissionWindow(
            fraction=config.admission_window_fraction, max_s=config.admission_window_max_s
        )
        self._num_steps = 0
        # Whether the last step ran or submitted a plan (the engine thread naps when not).
        self.last_step_ran = False

    # ----- requests ---------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request (raises InvalidArgument if it can never fit the KV cache)."""
        if request.adapter_id and not callable(getattr(self.executor, "load_adapter", None)):
            raise FailedPrecondition("this engine's executor cannot serve LoRA adapters")
        self._default_eos(request)
        self.attach_grammar(request)
        self.planner.add_request(request)
        self._unstarted.add(request.request_id)
        self._outputs.add_request(request)

    def abort_request(self, request_id: str) -> GenerationOutput | None:
        """Stop a request and free its blocks; None when it is unknown or already finished."""
        self.planner.release_kv(request_id)
        request = self.planner.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
        if request is None:
            return None
        self._retire(request)
        return self._outputs.final_output(request)

    def fail_all(self, error: DeepServeError) -> list[GenerationOutput]:
        """End every request with `error` (the executor broke); the core stays usable."""
        self._in_flight = None
        outputs = []
        for request in self.planner.finish_all(RequestStatus.FINISHED_ERROR):
            self._retire(request)
            outputs.append(self._outputs.final_output(request, error))
        return outputs

    def attach_grammar(self, request: Request) -> None:
        """Give a structured-output request its matcher if it has none yet (AsyncEngine
        compiles off this thread first; direct callers pay the compile here)."""
        constraint = request.sampling_params.structured_output
        if constraint is None or request.grammar is not None:
            return
        if self.grammar_compiler is None:
            raise FailedPrecondition("this engine has no tokenizer to enforce structured outputs")
        request.grammar = self.grammar_compiler.state(constraint)

    def _bitmask(self, rows: list[Request]) -> TokenBitmask | None:
        if not any(r.grammar is not None for r in rows):
            return None
        vocab_size = (
            self.grammar_compiler.vocab_size
            if self.grammar_compiler is not None
            else self.config.vocab_size
        )
        assert vocab_size is not None, "a constrained request needs the vocabulary size"
        return compute_bitmask(rows, vocab_size)

    # ----- KV hand-off, decode side -----------------------------------------------------------

    def reserve_remote_prefill(self, request: Request) -> KVReservation | None:
        """Allocate blocks for a prompt whose KV another instance computes; None when short.

        The prompt's cached prefix here (device or host tier) is reused and reported as held, so
        the sender skips it. The request waits for its KV (WAITING_FOR_REMOTE_KV) until
        `activate_remote_prefill`; abort_request frees the blocks meanwhile.
        """
        self._default_eos(request)
        self.attach_grammar(request)
        match = self.planner.reserve_remote_kv(request)
        if match is None:
            return None
        return KVReservation(
            request_id=request.request_id,
            block_ids=self.kv_cache.block_ids(request.request_id),
            num_held_blocks=len(match.blocks) + len(match.host_entries),
            num_prompt_tokens=request.num_prompt_tokens,
            block_size=self.kv_cache.block_size,
        )

    def write_remote_kv(self, request_id: str, first_block: int, tensor: torch.Tensor) -> None:
        """Store received KV (host layout, block axis 2) into a reservation's blocks."""
        if request_id not in self.planner.waiting_for_remote_kv:
            raise Cancelled(f"request {request_id!r} is no longer waiting for its KV")
        block_ids = self.kv_cache.block_ids(request_id)
        num_blocks = tensor.shape[2]
        if first_block < 0 or first_block + num_blocks > len(block_ids):
            raise FailedPrecondition(
                f"KV for blocks [{first_block}, {first_block + num_blocks}) of a "
                f"{len(block_ids)}-block reservation"
            )
        # Only this request references these blocks (fresh, not in the prefix cache yet), so no
        # step in flight reads them; the executor orders the write after submitted steps.
        _require(self.executor, "load_from_host")(
            block_ids[first_block : first_block + num_blocks], tensor
        )

    def activate_remote_prefill(
        self, request_id: str, first_token_id: int, num_cached_tokens: int = 0
    ) -> list[GenerationOutput]:
        """The prompt KV is in place: the request joins decoding with its first token."""
        request = self.planner.activate_remote_kv(request_id, first_token_id, num_cached_tokens)
        if request is None:
            return []  # aborted meanwhile; its abort output went out already
        self._outputs.add_request(request)
        return self._emit([(request, SampleResult(first_token_id))])

    # ----- KV hand-off, prefill side ----------------------------------------------------------

    def held_kv_blocks(self, request_id: str) -> list[int]:
        """Block ids a finished hold_kv request still holds (raises when it holds none)."""
        if not self.planner.holds_kv(request_id):
            raise FailedPrecondition(f"request {request_id!r} holds no finished KV")
        return self.kv_cache.block_ids(request_id)

    def export_held_kv(
        self, request_id: str, first_block: int = 0, num_blocks: int | None = None
    ) -> torch.Tensor:
        """Host copy of a finished hold_kv request's blocks [first_block, +num_blocks)."""
        block_ids = self.held_kv_blocks(request_id)
        end = len(block_ids) if num_blocks is None else first_block + num_blocks
        return _require(self.executor, "copy_to_host")(block_ids[first_block:end])

    def release_held_kv(self, request_id: str) -> bool:
        """Free a held request's blocks (its full blocks stay in the prefix cache)."""
        return self.planner.release_kv(request_id)

    def admission_hold_s(self) -> float:
        """How long to hold the first step of an idle engine for more arrivals (see
        engine/admission_window.py); 0 once anything runs."""
        if self.planner.num_running or self._in_flight is not None:
            return 0.0
        to_compute = self.planner.waiting_tokens_to_compute()
        return self.admission_window.hold_s(to_compute, self.config.step_token_budget)

    @property
    def has_work(self) -> bool:
        return self.planner.has_unfinished_requests or self._in_flight is not None

    # ----- one step ---------------------------------------------------------------------------

    def step(
        self, intake: Callable[[], list[GenerationOutput]] | None = None
    ) -> list[GenerationOutput]:
        """Advance every live request by one step; returns the outputs it produced.

        `intake` (pipelined steps) runs the caller's queued commands (new requests, aborts)
        once the previous step has finished, so that requests which arrived while it ran join
        this step's plan (`StepPlanner.top_up`); it returns the outputs the commands produced.
        """
        self._num_steps += 1
        self.last_step_ran = False
        self._place_adapter()
        if self.config.async_scheduling:
            return self._step_pipelined(intake)
        return self._step_serial()

    def drain(self) -> list[GenerationOutput]:
        """Run steps until no request is left (tests and offline use)."""
        outputs: list[GenerationOutput] = []
        while self.has_work:
            outputs.extend(self.step())
        return outputs

    def _step_serial(self) -> list[GenerationOutput]:
        plan = self.planner.plan_step()
        outputs = self._take_failed()
        self._note_started(plan)
        plan = self.planner.finalize_plan(plan)
        self.kv_cache.flush_transfers()
        sampled: list[tuple[Request, SampleResult]] = []
        if not plan.is_empty:
            rows = self._logit_rows(plan)
            self.last_step_ran = True
            started_ns = time.time_ns()
            mask = self._bitmask(rows)
            logits = self.executor.execute(plan)
            self._note_step_timing(plan, started_ns, time.time_ns())
            if mask is not None:
                apply_token_bitmask(logits, mask)
            sampled = self._sample(rows, logits)
            self._computed.add(plan.num_tokens)
        outputs.extend(self._emit(sampled))
        return outputs

    def _step_pipelined(
        self, intake: Callable[[], list[GenerationOutput]] | None
    ) -> list[GenerationOutput]:
        # Planned while the previous step still runs: decodes in it get placeholder tokens.
        plan = self.planner.plan_step()
        outputs = self._take_failed()
        self._note_started(plan)
        previous, self._in_flight = self._in_flight, None
        chained = previous is not None and self._submit_chained(plan, previous)
        sampled: list[tuple[Request, SampleResult]] = []
        if previous is not None:
            sampled = self._resolve(previous)
        if intake is not None:
            outputs.extend(intake())
        if chained:
            assert self._in_flight is not None
            # It started when the step ahead of it ended, about now.
            self._in_flight.started_ns = time.time_ns()
            self.planner.cache_chained_blocks(plan)
        else:
            # After the previous step finished: host copies may read blocks it wrote.
            plan = self.planner.finalize_plan(plan)
            if self.planner.top_up(plan):
                self._note_started(plan)
                outputs.extend(self._take_failed())
            self.kv_cache.flush_transfers()
            if not plan.is_empty:
                self._submit(plan, self._logit_rows(plan))
        # Detokenizing overlaps the step just submitted.
        outputs.extend(self._emit(sampled))
        return outputs

    def _submit(self, plan: StepPlan, rows: list[Request]) -> None:
        """Submit a finalized (or chained) plan, `rows` the request behind each logits row:
        sampled on the forward thread when its rows allow, else as logits, whose grammar masks
        are computed here while it runs."""
        self.last_step_ran = True
        started_ns = time.time_ns()
        if self._submit_sampled is not None and all(r.grammar is None for r in rows):
            future = self._submit_sampled(plan, self._sampler.bind(rows))
            self._in_flight = _InFlight(plan, rows, future, sampled=True, started_ns=started_ns)
            return
        future = self.executor.submit(plan)
        self._in_flight = _InFlight(plan, rows, future, sampled=False, started_ns=started_ns)
        # Every token the masks depend on was sampled before this step was submitted.
        self._in_flight.mask = self._bitmask(rows)

    def _submit_chained(self, plan: StepPlan, previous: _InFlight) -> bool:
        """Submit `plan` behind the unsampled step in flight, if it can be chained."""
        if (
            plan.is_empty
            or not previous.sampled
            or not all(len(seq.token_ids) == 1 for seq in previous.plan.sequences)
        ):
            return False
        rows = self._logit_rows(plan)
        if not all(r.grammar is None and self._sampler.reads_no_history(r) for r in rows):
            return False
        feeder_rows = {r.request_id: i for i, r in enumerate(previous.rows)}
        if not self.planner.chain_plan(plan, previous.plan.step_id, feeder_rows):
            return False
        # Host-tier copies go through the executor's queue, so they order with both steps.
        self.kv_cache.flush_transfers()
        self._submit(plan, rows)
        return True

    def _resolve(self, step: _InFlight) -> list[tuple[Request, SampleResult]]:
        """Wait for a submitted step and take its tokens."""
        result = step.future.result()
        self._note_step_timing(step.plan, step.started_ns, time.time_ns())
        self._computed.add(step.plan.num_tokens)
        if step.sampled:
            return self._take_sampled(step.rows, result)
        if step.mask is not None:
            apply_token_bitmask(result, step.mask)
        return self._sample(step.rows, result)

    def _adapter_slot(self, adapter_id: str) -> int | None:
        """The adapter's slot, marking it used (slots are evicted least recently used first)."""
        slot = self.adapter_slots.slot_of(adapter_id)
        if slot is not None:
            self.adapter_slots.touch(adapter_id)
        return slot

    def _place_adapter(self) -> None:
        """Put the first waiting request's missing adapter into a device slot (one per step).

        The copy is queued on the executor after the step in flight and before the one planned
        next, so it delays running decodes by at most one copy, and the planner admits the
        adapter's requests from this step on.
        """
        for request in self.planner.waiting:
            if not request.adapter_id or self.adapter_slots.slot_of(request.adapter_id) is not None:
                continue
            slot = self.adapter_slots.place(request.adapter_id, self.planner.adapter_slots_in_use())
            if slot is None:
                return  # every slot is busy: wait for a running adapter request to finish
            load = getattr(self.executor, "load_adapter", None)
            assert load is not None  # add_request refused adapter requests otherwise
            load(
                slot,
                request.adapter_weights,
                num_slots=self.config.lora_slots,
                max_rank=self.config.max_lora_rank,
            )
            return

    def _note_step_timing(self, plan: StepPlan, started_ns: int, ended_ns: int) -> None:
        """Marks queue exit and prompt chunks on each request's timeline (read by tracing),
        and teaches the admission window how long a token of prefill takes."""
        self.admission_window.note_step(plan.num_tokens, (ended_ns - started_ns) / 1e9)
        for seq in plan.sequences:
            request = self.planner.get_request(seq.request_id)
            if request is None:
                continue
            timeline = request.timeline
            if timeline.first_scheduled_ns is None:
                timeline.first_scheduled_ns = started_ns
            if seq.start_pos < request.num_prompt_tokens:
                timeline.prefill_chunks.append((started_ns, ended_ns, len(seq.token_ids)))

    def _logit_rows(self, plan: StepPlan) -> list[Request]:
        rows = []
        for seq in plan.sequences:
            if seq.needs_logits:
                request = self.planner.get_request(seq.request_id)
                assert request is not None
                rows.append(request)
        return rows

    def _sample(
        self, rows: list[Request], logits: torch.Tensor
    ) -> list[tuple[Request, SampleResult]]:
        if logits.shape[0] != len(rows):
            raise RuntimeError(
                f"executor returned {logits.shape[0]} rows for {len(rows)} sequences"
            )
        live = self._live_rows(rows)
        if not live:
            return []
        if len(live) < len(rows):
            index = torch.tensor(live, dtype=torch.long, device=logits.device)
            logits = logits.index_select(0, index)
        requests = [rows[i] for i in live]
        return self._take(requests, self._sampler.sample(logits, requests))

    def _take_sampled(
        self, rows: list[Request], results: list[SampleResult]
    ) -> list[tuple[Request, SampleResult]]:
        """A step sampled on the forward thread: keep the rows still live."""
        if len(results) != len(rows):
            raise RuntimeError(f"executor sampled {len(results)} rows for {len(rows)} sequences")
        live = self._live_rows(rows)
        return self._take([rows[i] for i in live], [results[i] for i in live])

    def _live_rows(self, rows: list[Request]) -> list[int]:
        # A request may have finished (stop string, abort) after its step was submitted.
        return [
            i
            for i, r in enumerate(rows)
            if self.planner.get_request(r.request_id) is r and not r.is_finished
        ]

    def _take(
        self, requests: list[Request], results: list[SampleResult]
    ) -> list[tuple[Request, SampleResult]]:
        """Append the sampled tokens to their requests (finishing those they end)."""
        if not requests:
            return []
        self.planner.update_from_output(
            {r.request_id: s.token_id for r, s in zip(requests, results, strict=True)}
        )
        self._generated.add(len(results))
        return list(zip(requests, results, strict=True))

    def _emit(self, sampled: list[tuple[Request, SampleResult]]) -> list[GenerationOutput]:
        outputs = []
        for request, result in sampled:
            outputs.append(self._outputs.token_output(request, result))
            if request.is_finished:
                self._retire(request)
        return outputs

    def _take_failed(self) -> list[GenerationOutput]:
        outputs = []
        for request in self.planner.take_failed():
            self._retire(request)
            error = ResourceExhausted(request.error or "the KV cache cannot hold this request")
            outputs.append(self._outputs.final_output(request, error))
        return outputs

    def _note_started(self, plan: StepPlan) -> None:
        for seq in plan.sequences:
            self._dequeued(seq.request_id)

    def _dequeued(self, request_id: str) -> None:
        if request_id in self._unstarted:
            self._unstarted.discard(request_id)
            if self._on_dequeued is not None:
                self._on_dequeued(request_id)

    def _retire(self, request: Request) -> None:
        """A request finished: drop the per-request state the core keeps for it."""
        self._dequeued(request.request_id)
        self._sampler.release(request.request_id)

    def _default_eos(self, request: Request) -> None:
        if not request.eos_token_ids and self.eos_token_ids:
            request.eos_token_ids = self.eos_token_ids

    # ----- figures ----------------------------------------------------------------------------

    def stats(self, num_queued_outside: int = 0) -> EngineStats:
        kv = self.kv_cache.stats()
        now = time.monotonic()
        return EngineStats(
            num_running=self.planner.num_running,
            num_waiting=(
                self.planner.num_waiting
                + self.planner.num_waiting_for_remote_kv
                + num_queued_outside
            ),
            kv_blocks_used=kv.num_used_blocks,
            kv_blocks_free=kv.num_free_blocks,
            kv_blocks_total=kv.num_blocks,
            kv_blocks_cached=kv.num_cached_blocks,
            host_blocks_used=kv.num_host_blocks_used,
            host_blocks_total=kv.num_host_blocks,
            prefix_cache_hit_rate=kv.prefix_hit_rate,
            generation_tokens_per_s=self._generated.rate(now),
            computed_tokens_per_s=self._computed.rate(now),
            num_preemptions=self.planner.num_preemptions,
            num_steps=self._num_steps,
            adapters_running=_count_adapters(self.planner.running),
            adapters_waiting=_count_adapters(self.planner.waiting),
            adapters_resident=tuple(self.adapter_slots.resident),
        )

    def shutdown(self) -> None:
        """Wait for the step in flight, then stop the executor if it can be stopped."""
        if self._in_flight is not None:
            future = self._in_flight.future
            self._in_flight = None
            try:
                future.result()
            except Exception:  # shutting down anyway
                pass
        shutdown = getattr(self.executor, "shutdown", None)
        if callable(shutdown):
            shutdown()


def _count_adapters(requests: list[Request]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for request in requests:
        if request.adapter_id:
            counts[request.adapter_id] = counts.get(request.adapter_id, 0) + 1
    return counts
