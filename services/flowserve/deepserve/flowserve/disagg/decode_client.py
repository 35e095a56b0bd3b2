"""Decode side of a hand-off: asks a prefill instance over gRPC for a prompt's KV and first
token, and writes the chunks into the blocks reserved here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import grpc

from deepserve.errors import (
    Cancelled,
    DeepServeError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from deepserve.flowserve.engine.kv_handoff import KVReservation, KVSink, PrefillResult
from deepserve.flowserve.transfer.assembler import KVAssembler
from deepserve.flowserve.transfer.bulk_tcp import BulkOffer, StreamReceiver
from deepserve.flowserve.transfer.host import local_host_id
from deepserve.flowserve.transfer.landing import KVRoom, LandingPool
from deepserve.flowserve.transfer.settings import TransferSettings
from deepserve.flowserve.transfer.wire import chunk_from_proto, tcp_room
from deepserve.rpc.client import insecure_channel
from deepserve.rpc.errors import error_from_rpc
from deepserve.v1 import common_pb2, flowserve_pb2, flowserve_pb2_grpc

log = logging.getLogger(__name__)

# A chunk's read queued on the TCP connection, and the room it fills.
TcpRead = tuple[asyncio.Future[None], KVRoom]


class PeerChannels:
    """One long-lived gRPC channel per prefill instance address."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def stub(self, address: str) -> flowserve_pb2_grpc.FlowServeServiceStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = insecure_channel(address)
            self._channels[address] = channel
        return flowserve_pb2_grpc.FlowServeServiceStub(channel)

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()


@dataclass(slots=True)
class TransferStats:
    """Running totals of the KV this instance received from prefill instances."""

    transfers: int = 0
    failures: int = 0
    blocks: int = 0
    bytes: int = 0
    layerwise: int = 0
    shared_memory: int = 0
    tcp: int = 0
    # Wall time from the Prefill call to its last message, summed (includes prefill compute).
    seconds: float = 0.0
    # Wall time from the first KV message to the last, summed (the transfer itself).
    transfer_seconds: float = 0.0
    skipped_blocks: int = 0


class GrpcPrefillSource:
    """A RemotePrefillSource that calls FlowServeService.Prefill on a prefill instance."""

    def __init__(
        self,
        peers: PeerChannels,
        address: str,
        prompt_token_ids: list[int],
        *,
        model: str,
        sampling: common_pb2.SamplingParams,
        settings: TransferSettings,
        layerwise: bool,
        stats: TransferStats | None = None,
        cache_salt: str = "",
        landing_pool: LandingPool | None = None,
    ) -> None:
        self.peers = peers
        self.address = address
        self.prompt_token_ids = list(prompt_token_ids)
        self.model = model
        self.sampling = sampling
        self.settings = settings
        self.layerwise = layerwise
        self.cache_salt = cache_salt
        self.stats = stats if stats is not None else TransferStats()
        # Reused host buffers that TCP KV lands in (the engine's; None: one per transfer).
        self.landing_pool = landing_pool
        # Figures of the last transfer (for stats and the benchmark).
        self.done: flowserve_pb2.PrefillDone | None = None

    def _request(self, reservation: KVReservation) -> flowserve_pb2.PrefillRequest:
        transports = [flowserve_pb2.KV_TRANSPORT_GRPC]
        if self.settings.allow_tcp:
            transports.insert(0, flowserve_pb2.KV_TRANSPORT_TCP)
        if self.settings.allow_shared_memory:
            transports.insert(0, flowserve_pb2.KV_TRANSPORT_SHARED_MEMORY)
        return flowserve_pb2.PrefillRequest(
            request_id=reservation.request_id,
            model=self.model,
            prompt_token_ids=self.prompt_token_ids,
            sampling=self.sampling,
            skip_blocks=reservation.num_held_blocks,
            block_size=reservation.block_size,
            mode=(
                flowserve_pb2.KV_TRANSFER_MODE_LAYERWISE
                if self.layerwise
                else flowserve_pb2.KV_TRANSFER_MODE_WHOLE_REQUEST
            ),
            transports=transports,
            host_id=local_host_id(),
            cache_salt=self.cache_salt,
        )

    async def _receive(self, assembler: KVAssembler, msg: flowserve_pb2.KVChunk) -> None:
        await _receive_chunk(self.address, assembler, msg)

    def _receive_tcp(
        self, assembler: KVAssembler, msg: flowserve_pb2.KVChunk, stream: StreamReceiver | None
    ) -> TcpRead:
        """Queues the read of a chunk whose bytes come on the transfer's TCP connection, into
        its place in the assembler's landing tensor; `_add_read` marks it landed once read."""
        if stream is None:
            raise Unavailable(f"prefill instance {self.address} sent TCP KV without an offer")
        try:
            room = tcp_room(msg, assembler)
        except DeepServeError as exc:
            raise Unavailable(
                f"KV transfer from prefill instance {self.address} failed: {exc}"
            ) from exc
        return stream.read_into(room.pieces), room

    async def _add_read(self, assembler: KVAssembler, read: TcpRead) -> None:
        future, room = read
        try:
            await future
            assembler.landed(room)
        except Cancelled:
            raise
        except (DeepServeError, OSError) as exc:
            raise Unavailable(
                f"KV transfer from prefill instance {self.address} failed: {exc}"
            ) from exc
        finally:
            room.release()

    async def _flush(self, assembler: KVAssembler) -> None:
        try:
            await assembler.flush()
        except Cancelled:
            raise
        except DeepServeError as exc:
            raise Unavailable(
                f"KV transfer from prefill instance {self.address} failed: {exc}"
            ) from exc

    async def prefill(self, reservation: KVReservation, sink: KVSink) -> PrefillResult:
        assembler = KVAssembler(
            sink, reservation.num_held_blocks, len(reservation.block_ids), self.landing_pool
        )
        call = self.peers.stub(self.address).Prefill(
            self._request(reservation), timeout=self.settings.prefill_timeout_s
        )
        started = time.monotonic()
        first_kv: float | None = None
        ok = False
        stream: StreamReceiver | None = None
        reads: list[TcpRead] = []
        try:
            while True:
                try:
                    msg = await asyncio.wait_for(call.read(), self.settings.idle_timeout_s)
                except TimeoutError:
                    raise Unavailable(
                        f"prefill instance {self.address} sent nothing for "
                        f"{self.settings.idle_timeout_s}s (hung?)"
                    ) from None
                if msg is grpc.aio.EOF:
                    raise Unavailable(
                        f"prefill instance {self.address} ended the transfer without a result"
                    )
                if msg.HasField("heartbeat"):
                    continue
                if msg.HasField("kv_offer"):
                    offer = msg.kv_offer
                    stream = await StreamReceiver.connect(
                        BulkOffer(offer.address, offer.token, 0), self.settings.idle_timeout_s
                    )
                    continue
                if msg.HasField("kv"):
                    if first_kv is None:
                        first_kv = time.monotonic()
                    if msg.kv.WhichOneof("payload") == "tcp_nbytes":
                        # Queued on the socket's own thread, in order, as soon as the message
                        # says where the bytes go (each lands in place: nothing to hold back),
                        # so the thread reads on while this loop takes the next messages.
                        reads.append(self._receive_tcp(assembler, msg.kv, stream))
                        while reads and reads[0][0].done():
                            await self._add_read(assembler, reads.pop(0))
                    else:
                        await self._receive(assembler, msg.kv)
                    continue
                done = msg.done
                while reads:
                    await self._add_read(assembler, reads.pop(0))
                await self._flush(assembler)
                if not assembler.complete:
                    raise Unavailable(
                        f"prefill instance {self.address} finished without blocks "
                        f"{assembler.missing_blocks}"
                    )
                self.done = done
                ok = True
                now = time.monotonic()
                stats = self.stats
                stats.transfers += 1
                stats.blocks += reservation.num_missing_blocks
                stats.skipped_blocks += reservation.num_held_blocks
                stats.bytes += assembler.bytes_received
                stats.layerwise += int(done.layerwise)
                stats.shared_memory += int(
                    done.transport == flowserve_pb2.KV_TRANSPORT_SHARED_MEMORY
                )
                stats.tcp += int(done.transport == flowserve_pb2.KV_TRANSPORT_TCP)
                stats.seconds += now - started
                stats.transfer_seconds += now - first_kv if first_kv is not None else 0.0
                return PrefillResult(done.first_token_id, done.cached_tokens)
        except grpc.aio.AioRpcError as exc:
            raise _prefill_failed(self.address, exc) from None
        finally:
            if stream is not None:
                stream.close()
            for _, room in reads:  # reads cut short by a failure
                with contextlib.suppress(BufferError):
                    room.release()
            if ok:
                # Every read was awaited and the sink copied the KV: the buffer can serve again.
                # (After a failure it is dropped instead: a read may still be writing into it.)
                assembler.release()
            else:
                self.stats.failures += 1
            # A no-op once the stream ended; otherwise it tells the prefill side to free its KV.
            with contextlib.suppress(Exception):
                call.cancel()


async def _receive_chunk(address: str, assembler: KVAssembler, msg: flowserve_pb2.KVChunk) -> None:
    try:
        chunk = chunk_from_proto(msg)
        await assembler.add(chunk)
    except Cancelled:
        raise  # this request was aborted here: not the prefill side's fault
    except DeepServeError as exc:
        # A segment the failing sender already removed, a malformed or mismatched chunk.
        raise Unavailable(f"KV transfer from prefill instance {address} failed: {exc}") from exc


def _prefill_failed(address: str, exc: grpc.aio.AioRpcError) -> DeepServeError:
    """Input errors keep their kind; anything else is the prefill side being unavailable."""
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Unavailable(f"prefill instance {address} timed out")
    error = error_from_rpc(exc)
    if isinstance(error, InvalidArgument | ResourceExhausted):
        error.message = f"prefill instance {address}: {error.message}"
        return error
    return Unavailable(f"prefill instance {address} failed: {error.message}")
