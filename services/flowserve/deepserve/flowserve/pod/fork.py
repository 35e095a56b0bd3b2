"""Fork (scale-up step 3): a new instance takes its weights from a running one of the same model.

The source streams its loaded, prepared weights (one rank file's worth: manifest, then chunks)
over gRPC `StreamWeights` while it keeps serving; the tensors themselves are the snapshot, so any
number of targets stream at once without the source copying its weights first. A target on the
source's own host skips the network: the source writes its weights once into a shared-memory
file in the target's folder and answers only its path (one memory copy). Each target
writes the chunks straight into a prepared-weights file in its host's weights cache and
publishes it there, so later instances on that host map it instead of forking again (a fork
seeds the host's DRAM copy). Podpool picks the source per target among the running instances,
new ones included, which makes a burst a relay tree rather than one source feeding all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from deepserve.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, Unavailable
from deepserve.flowserve.model.llama_weights import LlamaWeights
from deepserve.flowserve.model.prepared_weights import (
    RankFileWriter,
    TensorSlot,
    dtype_name,
    flatten_llama_weights,
    plan_layout,
    tensor_bytes,
    write_rank_file,
)
from deepserve.flowserve.transfer.bulk_tcp import BulkOffer, BulkSender, receive_to_writer
from deepserve.flowserve.transfer.host import local_host_id
from deepserve.rpc.client import insecure_channel
from deepserve.rpc.errors import error_from_rpc
from deepserve.scaling.weights_cache import WeightsCacheLayout, WeightsEntry, rank_file_name
from deepserve.v1 import flowserve_pb2, flowserve_pb2_grpc

log = logging.getLogger(__name__)

# Measured on localhost: larger messages were slower (more copying per message).
DEFAULT_CHUNK_BYTES = 1024 * 1024
# Seconds a bulk (TCP) fork may take from the offer to the last byte.
BULK_TIMEOUT_S = 300.0


def loaded_weights(engine: Any) -> LlamaWeights:
    """The weights an engine runs with; only a single-process (tp 1) engine can be a source."""
    runner = getattr(getattr(engine.core, "executor", None), "runner", None)
    if runner is None:
        raise FailedPrecondition(
            "this instance cannot be a fork source (tensor-parallel or not a model engine)"
        )
    return runner.model.weights


class WeightsBroadcaster:
    """Serves this instance's weights to any number of fork targets at once."""

    def __init__(self, weights_of: Callable[[], LlamaWeights]) -> None:
        self._weights_of = weights_of
        self.active_streams = 0
        self.streams_served = 0
        self.bytes_sent = 0

    async def stream(
        self, max_chunk_bytes: int = 0, shared_memory_dir: str = "", bulk_host: str = ""
    ) -> AsyncIterator[flowserve_pb2.StreamWeightsResponse]:
        chunk = max_chunk_bytes if max_chunk_bytes > 0 else DEFAULT_CHUNK_BYTES
        named = flatten_llama_weights(self._weights_of())
        if shared_memory_dir:
            # Same host: one file the target maps (its folder, a name of our choosing).
            self.active_streams += 1
            try:
                path, nbytes = await asyncio.to_thread(_write_into, shared_memory_dir, named)
            finally:
                self.active_streams -= 1
            self.bytes_sent += nbytes
            self.streams_served += 1
            yield flowserve_pb2.StreamWeightsResponse(shared_memory_file=str(path))
            return
        slots, total = plan_layout(named)
        manifest = flowserve_pb2.WeightsManifest(total_bytes=total)
        for slot in slots:
            manifest.tensors.add(
                name=slot.name,
                dtype=slot.dtype,
                shape=list(slot.shape),
                offset=slot.offset,
                nbytes=slot.nbytes,
            )
        self.active_streams += 1
        try:
            yield flowserve_pb2.StreamWeightsResponse(manifest=manifest)
            if bulk_host:
                # Another host asked for a socket: the bytes go there, this call only waits.
                sender = BulkSender(bulk_host, [tensor_bytes(named[s.name]) for s in slots])
                offer = sender.offer
                yield flowserve_pb2.StreamWeightsResponse(
                    bulk_offer=flowserve_pb2.BulkOffer(
                        address=offer.address, token=offer.token, nbytes=offer.nbytes
                    )
                )
                self.bytes_sent += await sender.serve(BULK_TIMEOUT_S)
                self.streams_served += 1
                return
            for slot in slots:
                data = tensor_bytes(named[slot.name])
                for start in range(0, slot.nbytes, chunk):
                    piece = bytes(data[start : start + chunk])
                    self.bytes_sent += len(piece)
                    yield flowserve_pb2.StreamWeightsResponse(
                        chunk=flowserve_pb2.WeightsChunk(offset=slot.offset + start, data=piece)
                    )
            self.streams_served += 1
        finally:
            self.active_streams -= 1


def _write_into(folder: str, named: dict[str, torch.Tensor]) -> tuple[Path, int]:
    if not os.path.isdir(folder):
        raise InvalidArgument("no such folder on this host", field="shared_memory_dir")
    path = Path(folder) / rank_file_name(0, 1)
    started = time.monotonic()
    nbytes = write_rank_file(path, named)
    log.info(
        "weights written for a fork target on this host",
        extra={"fields": {"bytes": nbytes, "seconds": round(time.monotonic() - started, 3)}},
    )
    return path, nbytes


_broadcasters: dict[int, WeightsBroadcaster] = {}


def broadcaster_for(engine: Any) -> WeightsBroadcaster:
    """One broadcaster per engine (its counters survive across streams)."""
    key = id(engine)
    found = _broadcasters.get(key)
    if found is None:
        _broadcasters.clear()  # a pod runs one engine at a time; drop the previous one's
        found = _broadcasters[key] = WeightsBroadcaster(lambda: loaded_weights(engine))
    return found


async def stream_weights(
    shell: Any, request: flowserve_pb2.StreamWeightsRequest
) -> AsyncIterator[flowserve_pb2.StreamWeightsResponse]:
    """The StreamWeights RPC body: checks the model, then streams the engine's weights."""
    engine = shell.require_engine(request.model)
    tp_size = request.tensor_parallel_size or 1
    if tp_size != 1:
        raise FailedPrecondition("fork is supported for tensor_parallel_size 1 only")
    same_host = bool(request.host_id) and request.host_id == local_host_id()
    shm_dir = request.shared_memory_dir if same_host else ""
    # The socket listens on this pod's own advertised address.
    bulk_host = shell.settings.common.host if request.bulk_tcp and not shm_dir else ""
    broadcaster = broadcaster_for(engine)
    async for message in broadcaster.stream(request.max_chunk_bytes, shm_dir, bulk_host):
        yield message


@dataclass(frozen=True, slots=True)
class ForkResult:
    """A fork target's copy and what the transfer cost."""

    entry: WeightsEntry
    nbytes: int
    seconds: float
    # "stream" (gRPC) or "shared memory" (a source on this host wrote the file).
    via: str = "stream"


async def receive_weights(
    address: str,
    *,
    model: str,
    model_dir: Path,
    layout: WeightsCacheLayout,
    dtype: torch.dtype,
    timeout_s: float = 120.0,
    max_chunk_bytes: int = 0,
    shared_memory: bool = True,
    bulk_tcp: bool = True,
) -> ForkResult:
    """Streams a running instance's weights into this host's cache; returns the published copy.

    With `shared_memory`, a source on this host writes the file itself instead of streaming;
    with `bulk_tcp`, a source on another host sends the bytes over a plain TCP connection
    (`transfer.bulk_tcp`), the gRPC call carrying only the manifest and the offer.
    """
    started = time.monotonic()
    staging = layout.new_staging_dir()
    writer: RankFileWriter | None = None
    shared_file = ""
    bulk: asyncio.Task[int] | None = None
    try:
        async with insecure_channel(address) as channel:
            stub = flowserve_pb2_grpc.FlowServeServiceStub(channel)
            call = stub.StreamWeights(
                flowserve_pb2.StreamWeightsRequest(
                    model=model,
                    tensor_parallel_size=1,
                    max_chunk_bytes=max_chunk_bytes,
                    host_id=local_host_id() if shared_memory else "",
                    shared_memory_dir=str(staging) if shared_memory else "",
                    bulk_tcp=bulk_tcp,
                ),
                timeout=timeout_s,
            )
            try:
                async for message in call:
                    if message.HasField("shared_memory_file"):
                        shared_file = message.shared_memory_file
                    elif message.HasField("manifest"):
                        slots = _slots(message.manifest, dtype)
                        writer = RankFileWriter(
                            staging / rank_file_name(0, 1), slots, message.manifest.total_bytes
                        )
                    elif writer is None:
                        raise InvalidArgument("weights chunk before the manifest", field="chunk")
                    elif message.HasField("bulk_offer"):
                        # Fetched beside the call, which ends once the source sent it all.
                        bulk = asyncio.create_task(_fetch(message.bulk_offer, writer, timeout_s))
                    else:
                        writer.write(message.chunk.offset, message.chunk.data)
                if bulk is not None:
                    await bulk
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise DeadlineExceeded(f"fork from {address} took over {timeout_s}s") from None
                raise error_from_rpc(exc) from None
        if shared_file:
            if Path(shared_file) != staging / rank_file_name(0, 1):
                raise Unavailable(f"fork source {address} wrote {shared_file}, not into {staging}")
            nbytes = os.stat(shared_file).st_size
        elif writer is None:
            raise Unavailable(f"fork source {address} sent no weights")
        else:
            nbytes = writer.written
            if nbytes != writer.total_bytes:
                raise Unavailable(
                    f"fork source {address} sent {nbytes} of {writer.total_bytes} bytes"
                )
            writer.close()
            writer = None
        entry = layout.publish(
            staging,
            model=model,
            model_dir=model_dir,
            dtype=dtype_name(dtype),
            tp_size=1,
            nbytes=nbytes,
            origin="fork",
        )
    except BaseException:
        if bulk is not None and not bulk.done():
            bulk.cancel()
            with contextlib.suppress(BaseException):
                await bulk
        if writer is not None:
            with contextlib.suppress(BufferError):  # a view a failed fetch still holds
                writer.close()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    seconds = time.monotonic() - started
    log.info(
        "weights forked",
        extra={"fields": {"source": address, "bytes": nbytes, "seconds": round(seconds, 3)}},
    )
    via = "shared memory" if shared_file else "bulk tcp" if bulk is not None else "stream"
    return ForkResult(entry, nbytes, seconds, via)


async def _fetch(offer: flowserve_pb2.BulkOffer, writer: RankFileWriter, timeout_s: float) -> int:
    """Receives a bulk offer into the rank file's data range, slot by slot (pwrite)."""
    if offer.nbytes != sum(s.nbytes for s in writer.slots):
        raise InvalidArgument("bulk offer size differs from the manifest", field="bulk_offer")
    segments = [(s.offset, s.nbytes) for s in writer.slots]
    return await receive_to_writer(
        BulkOffer(offer.address, offer.token, offer.nbytes), segments, writer.write, timeout_s
    )


def _slots(manifest: flowserve_pb2.WeightsManifest, dtype: torch.dtype) -> list[TensorSlot]:
    slots = [
        TensorSlot(t.name, t.dtype, tuple(t.shape), t.offset, t.nbytes) for t in manifest.tensors
    ]
    floats = {s.dtype for s in slots if s.dtype.startswith(("float", "bfloat"))}
    if floats and floats != {dtype_name(dtype)}:
        raise FailedPrecondition(
            f"fork source runs {', '.join(sorted(floats))}, this pod needs {dtype_name(dtype)}"
        )
    return slots
