"""The engine's step loop: schedule -> execute -> sample -> update, on one thread, no asyncio.

With asynchronous scheduling a step is pipelined: batch N+1 is scheduled while batch N runs
on the device (scheduling needs token counts only), then N's logits are sampled, the tokens
written into N+1's placeholders, and N+1 submitted; text deltas for N are produced while N+1
runs. Sequences that turned out finished at N are dropped from N+1 before it is submitted, and
a stop string found after submission only wastes that request's slot in N+1.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future
from typing import Any, Protocol

import torch

from deepserve.errors import Cancelled, DeepServeError, FailedPrecondition, ResourceExhausted
from deepserve.flowserve.disagg.handoff import KVReservation
from deepserve.flowserve.engine.config import EngineConfig
from deepserve.flowserve.engine.outputs import GenerationOutput, TokenLogprobs
from deepserve.flowserve.engine.request import Request, RequestStatus
from deepserve.flowserve.engine.stats import EngineStats, ThroughputMeter
from deepserve.flowserve.engine.step_plan import ScheduledBatch
from deepserve.flowserve.engine.step_planner import Scheduler, SchedulerConfig
from deepserve.flowserve.kv_cache import HostTransport, KVCacheManager, KVEventListener
from deepserve.flowserve.sampling import SamplingParams
from deepserve.flowserve.sampling.sampler import Sampler, SampleResult
from deepserve.flowserve.sampling.state import SamplingState


class StepExecutor(Protocol):
    """The part of deepserve.flowserve.runner.executor.Executor the engine core drives."""

    def submit(self, batch: ScheduledBatch) -> Future[torch.Tensor]: ...

    def execute(self, batch: ScheduledBatch) -> torch.Tensor: ...


class Detokenizer(Protocol):
    """deepserve.flowserve.engine.detokenizer.IncrementalDetokenizer's interface."""

    stopped: bool
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
            skip_special_tokens=getattr(params, "skip_special_tokens", True),
            stop=getattr(params, "stop", ()),
        )

    return make


def _require(executor: Any, method: str) -> Callable[..., Any]:
    fn = getattr(executor, method, None)
    if not callable(fn):
        raise FailedPrecondition(f"this executor cannot {method} (no KV hand-off)")
    return fn


class ExecutorHostTransport:
    """Splits the executor's one-tensor host copies into per-block payloads for the host tier."""

    # copy_to_host returns [layers, 2, blocks, block_size, kv_heads, head_dim].
    _BLOCK_DIM = 2

    def __init__(self, executor: Any) -> None:
        self._executor = executor

    def copy_to_host(self, block_ids: list[int]) -> list[torch.Tensor]:
        tensor = self._executor.copy_to_host(block_ids)
        # Own storage per block, so dropping one host entry frees its memory.
        return [t.clone() for t in tensor.unbind(self._BLOCK_DIM)]

    def load_from_host(self, block_ids: list[int], payloads: Sequence[torch.Tensor]) -> None:
        self._executor.load_from_host(block_ids, torch.stack(list(payloads), self._BLOCK_DIM))


class RequestSampler:
    """Keeps each request's SamplingState (params, output history, seeded RNG) for the Sampler."""

    def __init__(self, sampler: Sampler | None = None, eos_token_ids: Collection[int] = ()) -> None:
        self._sampler = sampler or Sampler()
        self._eos_token_ids = tuple(eos_token_ids)
        self._states: dict[str, SamplingState] = {}

    def sample(self, logits: torch.Tensor, requests: Sequence[Request]) -> list[SampleResult]:
        return self._sampler.sample(logits, [self._state(r) for r in requests])

    def release(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def _state(self, request: Request) -> SamplingState:
        state = self._states.get(request.request_id)
        if state is None:
            params = request.sampling_params
            state = SamplingState(
                params=params if isinstance(params, SamplingParams) else SamplingParams(),
                prompt_token_ids=request.prompt_token_ids,
                # The request's own list: penalties always see the current output.
                output_token_ids=request.output_token_ids,
                eos_token_ids=self._eos_token_ids,
            )
            self._states[request.request_id] = state
        return state


class EngineCore:
    """Owns the scheduler, KV cache, executor, sampler and detokenizers; runs one step at a time.

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
        kv_event_listener: KVEventListener | None = None,
        on_dequeued: Callable[[str], None] | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.executor = executor
        transport: HostTransport | None = None
        if config.num_host_blocks > 0 and hasattr(executor, "copy_to_host"):
            transport = ExecutorHostTransport(executor)
        num_blocks = config.num_gpu_blocks
        executor_blocks = getattr(executor, "num_blocks", None)
        if num_blocks is None:
            # The executor was built first, from the memory budget: its block count is the truth.
            num_blocks = (
                executor_blocks if executor_blocks is not None else config.resolve_num_gpu_blocks()
            )
        elif executor_blocks is not None and executor_blocks != num_blocks:
            raise ValueError(f"num_gpu_blocks={num_blocks} but the executor has {executor_blocks}")
        self.kv_cache = KVCacheManager(
            num_blocks,
            config.block_size,
            enable_prefix_caching=config.enable_prefix_caching,
            num_host_blocks=config.num_host_blocks,
            host_transport=transport,
            event_listener=kv_event_listener,
        )
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens), self.kv_cache
        )
        self.eos_token_ids = frozenset(eos_token_ids)
        self._sampler = RequestSampler(sampler, self.eos_token_ids)
        self._detokenizer_factory = detokenizer_factory
        self._detokenizers: dict[str, Detokenizer] = {}
        self._on_dequeued = on_dequeued
        self._unstarted: set[str] = set()
        # Decode side of a hand-off: requests whose prompt KV is arriving from another instance.
        self._remote: dict[str, Request] = {}
        # Prefill side: finished hold_kv requests whose blocks wait to be sent.
        self._held: dict[str, Request] = {}
        self.scheduler.blocks_held_elsewhere = lambda: len(self._remote) + len(self._held)
        # The submitted step: its batch, the request behind each logits row, its logits.
        self._in_flight: tuple[ScheduledBatch, list[Request], Future[torch.Tensor]] | None = None
        self._in_flight_started_ns = 0
        self._generated = ThroughputMeter()
        self._computed = ThroughputMeter()
        self._num_steps = 0
        # Whether the last step ran or submitted a batch (the engine thread naps when not).
        self.last_step_ran = False

    # ----- requests ---------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request (raises InvalidArgument if it can never fit the KV cache)."""
        if not request.eos_token_ids and self.eos_token_ids:
            request.eos_token_ids = self.eos_token_ids
        self.scheduler.add_request(request)
        self._unstarted.add(request.request_id)
        if self._detokenizer_factory is not None:
            detokenizer = self._detokenizer_factory(request)
            if detokenizer is not None:
                self._detokenizers[request.request_id] = detokenizer

    def abort_request(self, request_id: str) -> GenerationOutput | None:
        """Stop a request and free its blocks; None when it is unknown or already finished."""
        self.release_held_kv(request_id)
        remote = self._remote.pop(request_id, None)
        if remote is not None:
            self.kv_cache.free(remote)
            remote.status = RequestStatus.FINISHED_ABORTED
            return self._output(remote, [], "", None)
        request = self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
        if request is None:
            return None
        self._release(request)
        return self._output(request, [], "", None)

    def fail_all(self, error: DeepServeError) -> list[GenerationOutput]:
        """End every request with `error` (the executor broke); the core stays usable."""
        self._in_flight = None
        outputs = []
        for request_id in list(self._held):
            self.release_held_kv(request_id)
        for request in list(self._remote.values()):
            self._remote.pop(request.request_id)
            self.kv_cache.free(request)
            request.status = RequestStatus.FINISHED_ERROR
            outputs.append(self._output(request, [], "", None, error=error))
        for request_id in list(self.scheduler.requests):
            request = self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ERROR)
            if request is not None:
                self._release(request)
                outputs.append(self._output(request, [], "", None, error=error))
        return outputs

    # ----- KV hand-off, decode side -----------------------------------------------------------

    def reserve_remote_prefill(self, request: Request) -> KVReservation | None:
        """Allocate blocks for a prompt whose KV another instance computes; None when short.

        The prompt's cached prefix here (device or host tier) is reused and reported as held, so
        the sender skips it. The request stays out of the scheduler until
        `activate_remote_prefill`; abort_request frees the blocks meanwhile.
        """
        request_id = request.request_id
        if request_id in self._remote or self.scheduler.get_request(request_id) is not None:
            raise FailedPrecondition(f"request id {request_id!r} is already in use")
        if not request.eos_token_ids and self.eos_token_ids:
            request.eos_token_ids = self.eos_token_ids
        num_prompt = request.num_prompt_tokens
        match = self.kv_cache.match_prefix(
            request.all_token_ids, block_hashes=request.block_hashes, max_cached_tokens=num_prompt
        )
        if not self.kv_cache.alloc(request, num_prompt - match.num_tokens, match):
            return None
        self._remote[request_id] = request
        return KVReservation(
            request_id=request_id,
            block_ids=self.kv_cache.block_ids(request_id),
            num_held_blocks=len(match.blocks) + len(match.host_entries),
            num_prompt_tokens=num_prompt,
            block_size=self.kv_cache.block_size,
        )

    def write_remote_kv(self, request_id: str, first_block: int, tensor: torch.Tensor) -> None:
        """Store received KV (host layout, block axis 2) into a reservation's blocks."""
        if request_id not in self._remote:
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
        request = self._remote.pop(request_id, None)
        if request is None:
            return []  # aborted meanwhile; its abort output went out already
        request.num_cached_tokens = num_cached_tokens
        self.scheduler.add_prefilled(request)
        # Only now may other prompts match these blocks: their KV is final.
        self.kv_cache.cache_blocks(request, request.num_prompt_tokens)
        if self._detokenizer_factory is not None:
            detokenizer = self._detokenizer_factory(request)
            if detokenizer is not None:
                self._detokenizers[request_id] = detokenizer
        self.scheduler.update_from_output({request_id: first_token_id})
        return self._emit([(request, SampleResult(first_token_id))])

    # ----- KV hand-off, prefill side ----------------------------------------------------------

    def held_kv_blocks(self, request_id: str) -> list[int]:
        """Block ids a finished hold_kv request still holds (raises when it holds none)."""
        if request_id not in self._held:
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
        request = self._held.pop(request_id, None)
        if request is None:
            return False
        self.kv_cache.free(request)
        return True

    @property
    def num_remote_pending(self) -> int:
        return len(self._remote)

    @property
    def num_held(self) -> int:
        return len(self._held)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_unfinished_requests or self._in_flight is not None

    # ----- one step ---------------------------------------------------------------------------

    def step(self) -> list[GenerationOutput]:
        """Advance every live request by one step; returns the outputs it produced."""
        self._num_steps += 1
        self.last_step_ran = False
        if self.config.async_scheduling:
            return self._step_pipelined()
        return self._step_serial()

    def drain(self) -> list[GenerationOutput]:
        """Run steps until no request is left (tests and offline use)."""
        outputs: list[GenerationOutput] = []
        while self.has_work:
            outputs.extend(self.step())
        return outputs

    def _step_serial(self) -> list[GenerationOutput]:
        batch = self.scheduler.schedule()
        outputs = self._take_failed()
        self._note_started(batch)
        batch = self.scheduler.finalize_batch(batch)
        self.kv_cache.flush_transfers()
        sampled: list[tuple[Request, SampleResult]] = []
        if not batch.is_empty:
            rows = self._logit_rows(batch)
            self.last_step_ran = True
            started_ns = time.time_ns()
            logits = self.executor.execute(batch)
            self._note_step_timing(batch, started_ns, time.time_ns())
            sampled = self._sample(rows, logits)
            self._computed.add(batch.num_tokens)
        outputs.extend(self._emit(sampled))
        return outputs

    def _step_pipelined(self) -> list[GenerationOutput]:
        # Scheduled while the previous step still runs: decodes in it get placeholder tokens.
        batch = self.scheduler.schedule()
        outputs = self._take_failed()
        self._note_started(batch)
        sampled: list[tuple[Request, SampleResult]] = []
        if self._in_flight is not None:
            previous, rows, future = self._in_flight
            self._in_flight = None
            logits = future.result()
            self._note_step_timing(previous, self._in_flight_started_ns, time.time_ns())
            sampled = self._sample(rows, logits)
            self._computed.add(previous.num_tokens)
        # After the previous step finished: host copies may read blocks it wrote.
        batch = self.scheduler.finalize_batch(batch)
        self.kv_cache.flush_transfers()
        if not batch.is_empty:
            self.last_step_ran = True
            self._in_flight_started_ns = time.time_ns()
            self._in_flight = (batch, self._logit_rows(batch), self.executor.submit(batch))
        # Detokenizing overlaps the step just submitted.
        outputs.extend(self._emit(sampled))
        return outputs

    def _note_step_timing(self, batch: ScheduledBatch, started_ns: int, ended_ns: int) -> None:
        """Marks queue exit and prompt chunks on each request's timeline (read by tracing)."""
        for seq in batch.sequences:
            request = self.scheduler.get_request(seq.request_id)
            if request is None:
                continue
            timeline = request.timeline
            if timeline.first_scheduled_ns is None:
                timeline.first_scheduled_ns = started_ns
            if seq.start_pos < request.num_prompt_tokens:
                timeline.prefill_chunks.append((started_ns, ended_ns, len(seq.token_ids)))

    def _logit_rows(self, batch: ScheduledBatch) -> list[Request]:
        rows = []
        for seq in batch.sequences:
            if seq.needs_logits:
                request = self.scheduler.get_request(seq.request_id)
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
        # A request may have finished (stop string, abort) after its step was submitted.
        live = [
            (i, r)
            for i, r in enumerate(rows)
            if self.scheduler.get_request(r.request_id) is r and not r.is_finished
        ]
        if not live:
            return []
        if len(live) < len(rows):
            index = torch.tensor([i for i, _ in live], dtype=torch.long, device=logits.device)
            logits = logits.index_select(0, index)
        requests = [r for _, r in live]
        results = self._sampler.sample(logits, requests)
        self.scheduler.update_from_output(
            {r.request_id: s.token_id for r, s in zip(requests, results, strict=True)}
        )
        self._generated.add(len(results))
        return list(zip(requests, results, strict=True))

    def _emit(self, sampled: list[tuple[Request, SampleResult]]) -> list[GenerationOutput]:
        outputs = []
        for request, result in sampled:
            text = ""
            detokenizer = self._detokenizers.get(request.request_id)
            if detokenizer is not None:
                text = detokenizer.push(result.token_id)
                if detokenizer.stopped:
                    if request.is_finished:
                        # The same token hit a length limit too: the stop string wins.
                        request.status = RequestStatus.FINISHED_STOPPED
                        request.stop_reason = detokenizer.stop_match
                    else:
                        self.scheduler.finish_request(
                            request.request_id,
                            RequestStatus.FINISHED_STOPPED,
                            stop_reason=detokenizer.stop_match,
                        )
                elif request.is_finished:
                    text += detokenizer.flush()
            if request.is_finished:
                self._release(request)
            outputs.append(self._output(request, [result.token_id], text, result))
        return outputs

    def _take_failed(self) -> list[GenerationOutput]:
        outputs = []
        for request in self.scheduler.take_failed():
            self._release(request)
            error = ResourceExhausted(request.error or "the KV cache cannot hold this request")
            outputs.append(self._output(request, [], "", None, error=error))
        return outputs

    def _note_started(self, batch: ScheduledBatch) -> None:
        for seq in batch.sequences:
            self._dequeued(seq.request_id)

    def _dequeued(self, request_id: str) -> None:
        if request_id in self._unstarted:
            self._unstarted.discard(request_id)
            if self._on_dequeued is not None:
                self._on_dequeued(request_id)

    def _release(self, request: Request) -> None:
        if request.hold_kv and self.kv_cache.holds(request.request_id):
            self._held[request.request_id] = request
        self._dequeued(request.request_id)
        self._sampler.release(request.request_id)
        self._detokenizers.pop(request.request_id, None)

    @staticmethod
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

    # ----- figures ----------------------------------------------------------------------------

    def stats(self, num_queued_outside: int = 0) -> EngineStats:
        kv = self.kv_cache.stats()
        now = time.monotonic()
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting + len(self._remote) + num_queued_outside,
            kv_blocks_used=kv.num_used_blocks,
            kv_blocks_free=kv.num_free_blocks,
            kv_blocks_total=kv.num_blocks,
            kv_blocks_cached=kv.num_cached_blocks,
            host_blocks_used=kv.num_host_blocks_used,
            host_blocks_total=kv.num_host_blocks,
            prefix_cache_hit_rate=kv.prefix_hit_rate,
            generation_tokens_per_s=self._generated.rate(now),
            computed_tokens_per_s=self._computed.rate(now),
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=self._num_steps,
        )

    def shutdown(self) -> None:
        """Wait for the step in flight, then stop the executor if it can be stopped."""
        if self._in_flight is not None:
            _, _, future = self._in_flight
            self._in_flight = None
            try:
                future.result()
            except Exception:  # shutting down anyway
                pass
        shutdown = getattr(self.executor, "shutdown", None)
        if callable(shutdown):
            shutdown()
