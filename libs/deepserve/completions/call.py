"""One API call in flight: its engine stream, its choices' progress, and its accounting.

`start` routes and waits for the first delta, so everything that can fail before a token
exists (no instance, engine refusal) fails the call with a proper status instead of inside an
already-started stream. `close` runs exactly once, however the call ends (done, error, client
gone): it cancels what still runs, releases the rate-limit slot, and records usage.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from deepserve.completions.dispatcher import ChoiceDelta
from deepserve.completions.prepared import GenerationJob
from deepserve.errors import Unavailable
from deepserve.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Finisher = Callable[["ApiCall"], Awaitable[None]]


@dataclass(slots=True)
class ChoiceProgress:
    """Running totals of one choice."""

    started: bool = False
    tokens: int = 0
    finished: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class CallUsage:
    """Token counts of a call, as the API reports them (each prompt counted once)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class ApiCall:
    """Iterate it for deltas; always `await close()` (or use `async with`)."""

    def __init__(
        self,
        job: GenerationJob,
        tokenizer: Tokenizer,
        deltas: AsyncIterator[ChoiceDelta],
        on_close: Finisher,
    ) -> None:
        self.job = job
        self.tokenizer = tokenizer
        self._deltas = deltas
        self._on_close = on_close
        self._first: ChoiceDelta | None = None
        self._closed = False
        self.choices = [ChoiceProgress() for _ in range(job.fanout)]
        # Monotonic times of the request's arrival and first token (for latency metrics).
        self.opened_at = time.monotonic()
        self.first_token_at: float | None = None

    async def start(self) -> None:
        """Waits for the first delta (errors before the first token surface here)."""
        try:
            self._first = await anext(self._deltas)
        except StopAsyncIteration:
            raise Unavailable("the engine answered with an empty stream") from None
        self._track(self._first)

    def _track(self, delta: ChoiceDelta) -> None:
        choice = self.choices[delta.index]
        choice.started = True
        choice.tokens += len(delta.token_ids)
        if delta.finish_reason is not None:
            choice.finished = True
            choice.prompt_tokens = delta.prompt_tokens
            choice.completion_tokens = delta.completion_tokens
            choice.cached_tokens = delta.cached_tokens

    async def __aiter__(self) -> AsyncIterator[ChoiceDelta]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        async for delta in self._deltas:
            self._track(delta)
            yield delta

    def usage(self) -> CallUsage:
        """Prompt tokens once per prompt (not per choice); completion tokens of every choice.

        A prompt none of whose choices reached an engine costs nothing.
        """
        n = self.job.n
        prompt = sum(
            len(p.token_ids)
            for i, p in enumerate(self.job.prompts)
            if any(c.started for c in self.choices[i * n : (i + 1) * n])
        )
        completion = sum(c.completion_tokens if c.finished else c.tokens for c in self.choices)
        cached = sum(c.cached_tokens for i, c in enumerate(self.choices) if i % n == 0)
        return CallUsage(prompt, completion, cached)

    @property
    def completed(self) -> bool:
        return all(c.finished for c in self.choices)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._deltas.aclose()  # type: ignore[attr-defined]
        finally:
            # Shielded: a client that leaves must still give back its slot and pay its tokens.
            await asyncio.shield(asyncio.ensure_future(self._finish()))

    async def _finish(self) -> None:
        try:
            await self._on_close(self)
        except Exception:
            log.exception("accounting of request %s failed", self.job.request_id)

    async def __aenter__(self) -> ApiCall:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
