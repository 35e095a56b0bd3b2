"""Prefill side of a hand-off: compute a prompt (first token only), stream the KV blocks the
decode instance lacks, then free them (they stay in the prefix cache for later prompts)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from deepserve.errors import FailedPrecondition, InvalidArgument
from deepserve.flowserve.engine.outputs import GenerationOutput
from deepserve.flowserve.transfer.chunks import KVChunk, split_by_blocks
from deepserve.flowserve.transfer.layer_tap import LayerTap
from deepserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass(slots=True)
class PrefillJob:
    """One prompt a decode instance asked this instance to prefill."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    # Leading prompt blocks the decode instance holds already: never sent.
    skip_blocks: int
    block_size: int
    layerwise: bool = False
    # The prompt's cache salt: this side caches (and skips) blocks under the same chain.
    cache_salt: str = ""


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Nothing to send yet: the prompt is still queued or computing."""


@dataclass(frozen=True, slots=True)
class PrefillOutcome:
    """The last event of a prefill: the first token and what was sent."""

    first_token_id: int
    cached_tokens: int
    blocks_sent: int
    bytes_sent: int
    layerwise: bool


class PrefillServer:
    """Runs PrefillJobs on one engine; yields KV chunks, then a PrefillOutcome."""

    def __init__(
        self,
        engine: Any,
        *,
        max_chunk_bytes: int = 4 * 1024 * 1024,
        heartbeat_interval_s: float = 2.0,
    ) -> None:
        self.engine = engine
        self.max_chunk_bytes = max_chunk_bytes
        self.heartbeat_interval_s = heartbeat_interval_s
        self.layer_tap = LayerTap.attach(engine.core.executor)

    @property
    def supports_layerwise(self) -> bool:
        return self.layer_tap is not None

    async def run(self, job: PrefillJob) -> AsyncIterator[KVChunk | PrefillOutcome | Heartbeat]:
        """Stream the job's KV; the blocks are freed when this generator ends, however it ends."""
        if job.block_size != self.engine.config.block_size:
            raise FailedPrecondition(
                f"KV block size {job.block_size} (decode) != {self.engine.config.block_size} "
                "(prefill): the pair cannot exchange blocks"
            )
        num_blocks = -(-len(job.prompt_token_ids) // job.block_size)
        if not 0 <= job.skip_blocks <= num_blocks:
            raise InvalidArgument(
                f"skip_blocks {job.skip_blocks} outside [0, {num_blocks}]", field="skip_blocks"
            )
        # Only the first token is made here: the decode instance samples the rest. A min_tokens
        # above 1 is the decode side's to enforce; here it only keeps the first token from
        # being a stop token.
        params = dataclasses.replace(
            job.sampling_params, max_tokens=1, min_tokens=min(job.sampling_params.min_tokens, 1)
        )
        layerwise = job.layerwise and self.layer_tap is not None
        events: asyncio.Queue[KVChunk | GenerationOutput | BaseException] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        if layerwise:
            assert self.layer_tap is not None
            self.layer_tap.watch(
                job.request_id,
                job.skip_blocks,
                lambda chunk: loop.call_soon_threadsafe(events.put_nowait, chunk),
            )
        runner = asyncio.create_task(self._generate(job, params, events))
        blocks_sent = bytes_sent = 0
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), self.heartbeat_interval_s)
                except TimeoutError:
                    yield Heartbeat()
                    continue
                if isinstance(event, BaseException):
                    raise event
                if isinstance(event, KVChunk):
                    for chunk in split_by_blocks(
                        event.tensor,
                        event.first_block,
                        self.max_chunk_bytes,
                        layer_start=event.layer_start,
                        total_layers=event.total_layers,
                    ):
                        bytes_sent += chunk.nbytes
                        yield chunk
                    if event.layer_start == 0:
                        blocks_sent += event.num_blocks
                    continue
                output = event
                break
            tapped = layerwise and self.layer_tap is not None
            if tapped and self.layer_tap is not None:
                tapped = self.layer_tap.unwatch(job.request_id)
            if not tapped and job.skip_blocks < num_blocks:
                # Whole-request mode (or the tap missed the step): one copy of the blocks now.
                tensor = await self.engine.export_kv(job.request_id, job.skip_blocks)
                for chunk in split_by_blocks(tensor, job.skip_blocks, self.max_chunk_bytes):
                    bytes_sent += chunk.nbytes
                    yield chunk
                blocks_sent = num_blocks - job.skip_blocks
            yield PrefillOutcome(
                first_token_id=output.new_token_ids[0],
                cached_tokens=output.num_cached_tokens,
                blocks_sent=blocks_sent,
                bytes_sent=bytes_sent,
                layerwise=tapped,
            )
        finally:
            if self.layer_tap is not None:
                self.layer_tap.unwatch(job.request_id)
            if not runner.done():
                runner.cancel()  # closes the generate stream, which aborts the request
            # Whether it finished (held blocks) or not, nothing of it may stay allocated.
            self.engine.release_kv(job.request_id)

    async def _generate(
        self,
        job: PrefillJob,
        params: SamplingParams,
        events: asyncio.Queue[KVChunk | GenerationOutput | BaseException],
    ) -> None:
        last: GenerationOutput | None = None
        try:
            async for output in self.engine.generate(
                job.request_id,
                job.prompt_token_ids,
                params,
                hold_kv=True,
                cache_salt=job.cache_salt,
            ):
                last = output
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            events.put_nowait(exc)
            return
        if last is None or not last.new_token_ids:
            events.put_nowait(FailedPrecondition(f"prefill of {job.request_id} made no token"))
            return
        events.put_nowait(last)
