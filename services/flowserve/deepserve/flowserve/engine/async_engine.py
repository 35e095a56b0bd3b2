"""The asyncio face of FlowServe: `generate` streams outputs while the engine loop runs in a thread.

The busy loop (EngineCore.step) never runs on the event loop: it owns its own thread, takes
new requests and aborts from a command list, and hands outputs back with
loop.call_soon_threadsafe, one callback per step and event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from deepserve.errors import (
    Cancelled,
    DeepServeError,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from deepserve.flowserve.engine.config import EngineConfig
from deepserve.flowserve.engine.core import EngineCore, StepExecutor
from deepserve.flowserve.engine.kv_handoff import KVReservation, PrefillResult, RemotePrefillSource
from deepserve.flowserve.engine.output_processor import DetokenizerFactory
from deepserve.flowserve.engine.outputs import GenerationOutput, TokenLogprobs
from deepserve.flowserve.engine.request import Request
from deepserve.flowserve.engine.stats import EngineStats
from deepserve.flowserve.kv_cache import HostTransport, KVEventListener
from deepserve.flowserve.kv_cache.manager import PinnedContext
from deepserve.flowserve.lora.host_cache import AdapterHostCache
from deepserve.flowserve.sampling.grammar import GrammarCompiler
from deepserve.flowserve.sampling.sampler import Sampler
from deepserve.prefix_hash import adapter_salt
from deepserve.sampling_params import SamplingParams

__all__ = ["AsyncEngine", "EngineConfig", "EngineCore", "GenerationOutput", "TokenLogprobs"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How long a request aborted mid-transfer waits for its abort output from the engine thread.
_ABORT_OUTPUT_WAIT_S = 5.0


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[GenerationOutput]


class AsyncEngine:
    """Runs an EngineCore on its own thread and streams each request's outputs to asyncio."""

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
        grammar_compiler: GrammarCompiler | None = None,
        adapter_cache: AdapterHostCache | None = None,
    ) -> None:
        self.config = config
        self.grammar_compiler = grammar_compiler
        # Multi-LoRA: the host-DRAM tier of adapters (None: this engine serves no adapters).
        self.adapter_cache = adapter_cache
        self.core = EngineCore(
            config,
            executor,
            sampler=sampler,
            eos_token_ids=eos_token_ids,
            detokenizer_factory=detokenizer_factory,
            host_transport=host_transport,
            kv_event_listener=kv_event_listener,
            on_dequeued=self._on_dequeued,
            grammar_compiler=grammar_compiler,
        )
        self._capacity_tokens = self.core.kv_cache.pool.num_blocks * config.block_size
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._commands: list[Callable[[], list[GenerationOutput]]] = []
        self._streams: dict[str, _Stream] = {}
        # Accepted and not started yet (inbox + waiting for the first time): the queue bound.
        self._num_queued = 0
        self._stats = self.core.stats()
        self._stopping = False
        self._thread: threading.Thread | None = None

    @classmethod
    def from_executor(cls, config: EngineConfig, executor: Any, **kwargs: Any) -> AsyncEngine:
        """An engine whose eos ids and vocabulary size come from the executor's model config."""
        model_config = getattr(executor, "config", None)
        if model_config is not None:
            kwargs.setdefault("eos_token_ids", tuple(model_config.eos_token_ids))
            if config.vocab_size is None:
                config = dataclasses.replace(config, vocab_size=model_config.vocab_size)
        return cls(config, executor, **kwargs)

    # ----- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread (generate() does it on first use)."""
        with self._lock:
            if self._thread is not None or self._stopping:
                return
            self._thread = threading.Thread(target=self._run, name="flowserve-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the loop, end open streams with Unavailable, and shut the executor down."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
        else:
            self.core.shutdown()

    # ----- requests ---------------------------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams | None = None,
        *,
        hold_kv: bool = False,
        priority: int = 0,
        output_token_ids: Sequence[int] = (),
        cache_salt: str = "",
        adapter: str = "",
        adapter_path: str = "",
    ) -> AsyncIterator[GenerationOutput]:
        """Stream a request's outputs; the last one has finish_reason set.

        Raises InvalidArgument (bad input, a structured-output grammar that does not compile),
        ResourceExhausted (queue full, or the KV cache can never hold the request) before the
        first output. Closing the iterator early aborts the request. With hold_kv, a request
        that finishes normally keeps its KV blocks until `release_kv` (a prefill instance
        exports them first with `export_kv`). `cache_salt` seeds its prefix-cache hashes.

        `output_token_ids` resumes a migrated request: tokens another instance generated and
        streamed. They count as generated (limits, penalties, stop rules, the seeded sampler,
        the detokenizer, usage) and are not streamed again; outputs start at the next token.

        `adapter` serves the request with that LoRA adapter (read from `adapter_path` unless
        this engine holds it already; the read is on the request's timeline). Its prefix-cache
        hashes are namespaced by the adapter.
        """
        request = self._build_request(
            request_id, prompt_token_ids, sampling_params, output_token_ids
        )
        request.hold_kv = hold_kv
        request.priority = priority
        request.cache_salt = adapter_salt(cache_salt, adapter)
        if adapter:
            await self._attach_adapter(request, adapter, adapter_path)
        await self._compile_grammar(request)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._wakeup:
            if self._stopping:
                raise Unavailable("the engine is shutting down")
            if request_id in self._streams:
                raise InvalidArgument(f"request id {request_id!r} is in use", field="request_id")
            if self._num_queued >= self.config.max_queue_len:
                raise ResourceExhausted(
                    f"{self._num_queued} requests are queued (max_queue_len)", retry_after_s=1.0
                )
            self._num_queued += 1
            self._streams[request_id] = stream
            self._commands.append(lambda: self._add(request))
            self._wakeup.notify()
        self.start()
        async for output in self._stream_outputs(request_id, stream):
            yield output

    async def generate_remote(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams | None,
        source: RemotePrefillSource,
        *,
        reserve_timeout_s: float = 30.0,
        cache_salt: str = "",
    ) -> AsyncIterator[GenerationOutput]:
        """Like generate, but the prompt's KV and first token come from `source` (a prefill
        instance): blocks are reserved here (the cached prefix is reused and not sent), filled
        by the source, and the request then decodes on this engine.

        Errors of the source propagate unchanged (the caller names the failed side); the
        reservation is freed on every failure, abort or early close.
        """
        request = self._build_request(request_id, prompt_token_ids, sampling_params)
        request.cache_salt = cache_salt
        await self._compile_grammar(request)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._wakeup:
            if self._stopping:
                raise Unavailable("the engine is shutting down")
            if request_id in self._streams:
                raise InvalidArgument(f"request id {request_id!r} is in use", field="request_id")
            self._streams[request_id] = stream
        self.start()
        try:
            reservation = await self._reserve(request, reserve_timeout_s)
            sink = _EngineKVSink(self, request_id)
            result = await source.prefill(reservation, sink)
            await self._activate(request_id, result)
        except BaseException as exc:
            self.abort(request_id)  # frees the reservation (a no-op if it never got one)
            if isinstance(exc, Cancelled):
                # Aborted mid-transfer (the sink refused the KV): end like any aborted request,
                # with the abort output the engine delivers (it may trail the sink's error).
                try:
                    output = await asyncio.wait_for(stream.queue.get(), _ABORT_OUTPUT_WAIT_S)
                except TimeoutError:
                    output = None
                if output is not None and output.finished and output.error is None:
                    self._forget_stream(request_id, stream)
                    yield output
                    return
            self._forget_stream(request_id, stream)
            raise
        async for output in self._stream_outputs(request_id, stream):
            yield output

    async def _attach_adapter(self, request: Request, adapter: str, path: str) -> None:
        if self.adapter_cache is None:
            raise FailedPrecondition(
                "this instance does not serve LoRA adapters (tensor parallel or disabled)"
            )
        started = time.time_ns()
        weights, loaded = await self.adapter_cache.get(adapter, path)
        if loaded:
            request.timeline.adapter_load = (started, time.time_ns())
        request.adapter_id = adapter
        request.adapter_weights = weights

    def adapter_requests(self) -> tuple[dict[str, int], dict[str, int]]:
        """Requests per adapter, (running, waiting): for a `vllm:lora_requests_info` gauge."""
        return self._stats.adapters_running, self._stats.adapters_waiting

    def held_adapters(self) -> list[str]:
        """Adapters this engine holds (on the device or in host DRAM), for routing affinity."""
        held = dict.fromkeys(self._stats.adapters_resident)
        if self.adapter_cache is not None:
            held.update(dict.fromkeys(self.adapter_cache.held))
        return list(held)

    async def _compile_grammar(self, request: Request) -> None:
        """Structured outputs: compile (or take from the cache) the request's grammar in a
        worker thread, so a first compile never stalls the step loop."""
        constraint = request.sampling_params.structured_output
        if constraint is None:
            return
        compiler = self.grammar_compiler
        if compiler is None:
            raise InvalidArgument(
                "this engine has no tokenizer to enforce structured outputs",
                field=constraint.field,
            )
        # A grammar compiled before is copied here; only a first compile goes to a thread (a
        # thread hop per request would stagger the admission of requests sent together).
        request.grammar = compiler.cached_state(constraint) or await asyncio.to_thread(
            compiler.state, constraint
        )

    # ----- explicit context caching -----------------------------------------------------------

    async def pin_context(
        self,
        context_id: str,
        token_ids: Sequence[int],
        *,
        salt: str = "",
        expires_at: float = 0.0,
        attempts: int = 3,
    ) -> tuple[int, int]:
        """Pin a prompt's full blocks under `context_id`, computing what is not cached (a
        one-token generation; blocks on the host tier are populated back). Returns (tokens
        pinned, tokens that were already cached here)."""
        tokens = list(token_ids)
        block_size = self.config.block_size
        full = len(tokens) // block_size * block_size
        if full == 0:
            raise InvalidArgument(
                f"a context shorter than one KV block ({block_size} tokens) cannot be pinned",
                field="prompt_token_ids",
            )

        def cached(core: EngineCore) -> int:
            return core.kv_cache.match_prefix(tokens, salt=salt).num_device_tokens

        already = await asyncio.wrap_future(self.call_in_engine(cached))
        pinned = 0
        for attempt in range(attempts):
            if attempt or already < full:
                params = SamplingParams(temperature=0.0, max_tokens=1)
                request_id = f"pin-{context_id}-{attempt}-{time.monotonic_ns()}"
                async for _ in self.generate(request_id, tokens, params, cache_salt=salt):
                    pass
            pinned = await asyncio.wrap_future(
                self.call_in_engine(
                    lambda core: core.kv_cache.pin(
                        context_id, tokens, salt=salt, expires_at=expires_at
                    )
                )
            )
            if pinned >= full:
                break  # else evicted between the prefill and the pin: compute again
        return pinned, min(already, pinned)

    async def unpin_context(self, context_id: str) -> bool:
        return await asyncio.wrap_future(
            self.call_in_engine(lambda core: core.kv_cache.unpin(context_id))
        )

    async def pinned_contexts(self) -> list[PinnedContext]:
        return await asyncio.wrap_future(self.call_in_engine(lambda core: core.kv_cache.pinned()))

    async def unpin_expired(self, now: float) -> list[str]:
        return await asyncio.wrap_future(
            self.call_in_engine(lambda core: core.kv_cache.unpin_expired(now))
        )

    async def export_kv(
        self, request_id: str, first_block: int = 0, num_blocks: int | None = None
    ) -> torch.Tensor:
        """Host copy of a finished hold_kv request's blocks (raises when it holds none)."""
        future = self.call_in_engine(
            lambda core: core.export_held_kv(request_id, first_block, num_blocks)
        )
        return await asyncio.wrap_future(future)

    async def held_kv_blocks(self, request_id: str) -> list[int]:
        future = self.call_in_engine(lambda core: core.held_kv_blocks(request_id))
        return await asyncio.wrap_future(future)

    def release_kv(self, request_id: str) -> Future[bool]:
        """Free a hold_kv request's blocks (thread-safe; its full blocks stay prefix-cached)."""
        return self.call_in_engine(lambda core: core.release_held_kv(request_id))

    async def _reserve(self, request: Request, timeout_s: float) -> KVReservation:
        deadline = time.monotonic() + timeout_s
        while True:
            future = self.call_in_engine(lambda core: core.reserve_remote_prefill(request))
            reservation = await asyncio.wrap_future(future)
            if reservation is not None:
                return reservation
            if time.monotonic() >= deadline:
                raise ResourceExhausted(
                    f"no KV blocks for a {request.num_prompt_tokens}-token prompt within "
                    f"{timeout_s}s",
                    retry_after_s=1.0,
                )
            # Blocks free up as running requests finish; a short nap keeps this cheap.
            await asyncio.sleep(0.005)

    async def _activate(self, request_id: str, result: PrefillResult) -> None:
        future: Future[None] = Future()

        def command() -> list[GenerationOutput]:
            if not future.set_running_or_notify_cancel():
                return []  # the request is being aborted (its abort frees the reservation)
            try:
                outputs = self.core.activate_remote_prefill(
                    request_id, result.first_token_id, result.num_cached_tokens
                )
            except Exception as exc:
                future.set_exception(exc)
                return []
            future.set_result(None)
            return outputs

        self._push_command(command)
        await asyncio.wrap_future(future)

    async def _stream_outputs(
        self, request_id: str, stream: _Stream
    ) -> AsyncIterator[GenerationOutput]:
        finished = False
        try:
            while True:
                output = await stream.queue.get()
                if output.error is not None:
                    finished = True
                    raise output.error
                if output.finished:
                    finished = True
                yield output
                if finished:
                    return
        finally:
            self._forget_stream(request_id, stream)
            if not finished:
                self.abort(request_id)

    def _forget_stream(self, request_id: str, stream: _Stream) -> None:
        with self._lock:
            if self._streams.get(request_id) is stream:
                del self._streams[request_id]

    def abort(self, request_id: str) -> bool:
        """Stop a request (thread-safe); False when no open stream has that id."""
        with self._wakeup:
            known = request_id in self._streams
            self._commands.append(lambda: self._abort(request_id))
            self._wakeup.notify()
        return known

    def stats(self) -> EngineStats:
        """The latest snapshot, refreshed after every step."""
        with self._lock:
            return self._stats

    def call_in_engine(self, fn: Callable[[EngineCore], T]) -> Future[T]:
        """Run fn(core) on the engine thread between steps (e.g. KV pin / match_id)."""
        future: Future[T] = Future()

        def command() -> list[GenerationOutput]:
            if not future.set_running_or_notify_cancel():
                return []  # the caller stopped waiting (asyncio cancellation): skip it
            try:
                result = fn(self.core)
            except Exception as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)
            return []

        self._push_command(command)
        return future

    def _push_command(self, command: Callable[[], list[GenerationOutput]]) -> None:
        with self._wakeup:
            self._commands.append(command)
            self._wakeup.notify()
        self.start()

    # ----- validation -------------------------------------------------------------------------

    def _build_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams | None,
        output_token_ids: Sequence[int] = (),
    ) -> Request:
        if not request_id:
            raise InvalidArgument("must not be empty", field="request_id")
        prompt = list(prompt_token_ids)
        if not prompt:
            raise InvalidArgument("the prompt has no tokens", field="prompt_token_ids")
        outputs = list(output_token_ids)
        vocab_size = self.config.vocab_size
        for name, token_ids in (("prompt_token_ids", prompt), ("output_token_ids", outputs)):
            for token_id in token_ids:
                if (
                    not isinstance(token_id, int)
                    or token_id < 0
                    or (vocab_size is not None and token_id >= vocab_size)
                ):
                    raise InvalidArgument(
                        f"token id {token_id!r} is outside the vocabulary", field=name
                    )
        params = params if params is not None else SamplingParams()
        params.validate(vocab_size)
        window = min(self.config.max_model_len, self._capacity_tokens)
        if len(prompt) >= window:
            raise InvalidArgument(
                f"the prompt has {len(prompt)} tokens; the context window is {window}",
                field="prompt_token_ids",
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else window - len(prompt)
        if len(prompt) + max_tokens > window:
            raise InvalidArgument(
                f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the context "
                f"window of {window} tokens",
                field="max_tokens",
            )
        if len(outputs) >= max_tokens:
            raise InvalidArgument(
                f"{len(outputs)} tokens were already generated; max_tokens is {max_tokens}",
                field="output_token_ids",
            )
        return Request(
            request_id=request_id,
            prompt_token_ids=prompt,
            max_tokens=max_tokens,
            sampling_params=params,
            output_token_ids=outputs,
        )

    # ----- engine thread ----------------------------------------------------------------------

    def _add(self, request: Request) -> list[GenerationOutput]:
        try:
            self.core.add_request(request)
        except Exception as exc:
            self._on_dequeued(request.request_id)
            error = exc if isinstance(exc, DeepServeError) else Unavailable(str(exc))
            return [_error_output(request, error)]
        return []

    def _abort(self, request_id: str) -> list[GenerationOutput]:
        output = self.core.abort_request(request_id)
        return [output] if output is not None else []

    def _on_dequeued(self, request_id: str) -> None:
        with self._lock:
            self._num_queued -= 1

    def _run(self) -> None:
        # The loop's own torch work (sampling) is small; run it without an OpenMP team of its
        # own, which on CPU would keep cores spinning while the forward thread computes (a
        # one-request decode step measured 46 -> 34 ms). The OpenMP team is per thread, but torch
        # also keeps the value for threads started later: see deepserve.flowserve.runner.cpu_threads.
        torch.set_num_threads(1)
        while True:
            with self._wakeup:
                while not self._commands and not self._stopping and not self.core.has_work:
                    self._wakeup.wait()
                commands, self._commands = self._commands, []
                stopping = self._stopping
            was_idle = not self.core.has_work
            outputs = self._run_commands(commands)
            if was_idle and not stopping:
                burst, stopping = self._gather_burst()
                outputs.extend(burst)
            if stopping:
                outputs.extend(self.core.fail_all(Unavailable("the engine shut down")))
                self._deliver(outputs)
                self.core.shutdown()
                return
            idle = False
            if self.core.has_work:
                try:
                    outputs.extend(self.core.step(self._intake))
                    idle = not self.core.last_step_ran and not outputs
                except Exception as exc:
                    logger.exception("engine step failed; failing every request")
                    error = exc if isinstance(exc, DeepServeError) else Unavailable(str(exc))
                    outputs.extend(self.core.fail_all(error))
            stats = self.core.stats()
            with self._lock:
                self._stats = stats
            self._deliver(outputs)
            if idle:
                # Nothing could run (should not last): nap instead of spinning on the lock.
                with self._wakeup:
                    self._wakeup.wait(0.001)

    def _intake(self) -> list[GenerationOutput]:
        """Mid-step (after the previous step, before the next is submitted): the commands
        queued meanwhile, so that new requests can join the step about to run."""
        with self._wakeup:
            commands, self._commands = self._commands, []
        return self._run_commands(commands)

    def _run_commands(
        self, commands: list[Callable[[], list[GenerationOutput]]]
    ) -> list[GenerationOutput]:
        outputs: list[GenerationOutput] = []
        for command in commands:
            try:
                outputs.extend(command())
            except Exception:  # a bug in one command must not stop the engine
                logger.exception("engine command failed")
        return outputs

    def _gather_burst(self) -> tuple[list[GenerationOutput], bool]:
        """The engine was idle and got work: hold the first step briefly (the core says how
        long) so requests of the same burst, a few ms behind, start in it too. Returns the
        outputs of the commands run meanwhile, and whether a stop came."""
        outputs: list[GenerationOutput] = []
        started = time.monotonic()
        while True:
            remaining = started + self.core.admission_hold_s() - time.monotonic()
            if remaining <= 0:
                return outputs, False
            with self._wakeup:
                if not self._commands and not self._stopping:
                    self._wakeup.wait(remaining)
                commands, self._commands = self._commands, []
                stopping = self._stopping
            outputs.extend(self._run_commands(commands))
            if stopping:
                return outputs, True

    def _deliver(self, outputs: list[GenerationOutput]) -> None:
        if not outputs:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, GenerationOutput]]]
        by_loop = defaultdict(list)
        with self._lock:
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is not None:
                    by_loop[stream.loop].append((stream, output))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed; nobody is listening
                pass


class _EngineKVSink:
    """Writes received KV into a reservation's blocks on the engine thread."""

    def __init__(self, engine: AsyncEngine, request_id: str) -> None:
        self._engine = engine
        self._request_id = request_id

    async def write(self, first_block: int, tensor: torch.Tensor) -> None:
        request_id = self._request_id
        future = self._engine.call_in_engine(
            lambda core: core.write_remote_kv(request_id, first_block, tensor)
        )
        await asyncio.wrap_future(future)


def _put_all(items: list[tuple[_Stream, GenerationOutput]]) -> None:
    for stream, output in items:
        stream.queue.put_nowait(output)


def _error_output(request: Request, error: DeepServeError) -> GenerationOutput:
    return GenerationOutput(
        request_id=request.request_id,
        new_token_ids=[],
        new_text="",
        num_prompt_tokens=request.num_prompt_tokens,
        num_cached_tokens=0,
        num_output_tokens=0,
        finish_reason="error",
        error=error,
    )
