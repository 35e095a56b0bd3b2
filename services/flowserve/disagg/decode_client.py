"""Decode side of a hand-off: asks a prefill instance over gRPC for a prompt's KV and first
token, and writes the chunks into the blocks reserved here."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from deepserve.errors import (
    DeepServeError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from deepserve.flowserve.disagg.handoff import KVReservation, KVSink, PrefillResult
from deepserve.flowserve.transfer.assembler import KVAssembler
from deepserve.flowserve.transfer.host import local_host_id
from deepserve.flowserve.transfer.settings import TransferSettings
from deepserve.flowserve.transfer.wire import chunk_from_proto
from deepserve.rpc.client import insecure_channel
from deepserve.rpc.errors import error_from_rpc
from deepserve.v1 import common_pb2, flowserve_pb2, flowserve_pb2_grpc

log = logging.getLogger(__name__)


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
    ) -> None:
        self.peers = peers
        self.address = address
        self.prompt_token_ids = list(prompt_token_ids)
        self.model = model
        self.sampling = sampling
        self.settings = settings
        self.layerwise = layerwise
        # Figures of the last transfer (for stats and the benchmark).
        self.done: flowserve_pb2.PrefillDone | None = None

    def _request(self, reservation: KVReservation) -> flowserve_pb2.PrefillRequest:
        transports = [flowserve_pb2.KV_TRANSPORT_GRPC]
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
        )

    async def prefill(self, reservation: KVReservation, sink: KVSink) -> PrefillResult:
        assembler = KVAssembler(sink, reservation.num_held_blocks, len(reservation.block_ids))
        call = self.peers.stub(self.address).Prefill(
            self._request(reservation), timeout=self.settings.prefill_timeout_s
        )
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
                if msg.HasField("kv"):
                    await assembler.add(chunk_from_proto(msg.kv))
                    continue
                done = msg.done
                if not assembler.complete:
                    raise Unavailable(
                        f"prefill instance {self.address} finished without blocks "
                        f"{assembler.missing_blocks}"
                    )
                self.done = done
                return PrefillResult(done.first_token_id, done.cached_tokens)
        except grpc.aio.AioRpcError as exc:
            raise _prefill_failed(self.address, exc) from None
        finally:
            # A no-op once the stream ended; otherwise it tells the prefill side to free its KV.
            with contextlib.suppress(Exception):
                call.cancel()


def _prefill_failed(address: str, exc: grpc.aio.AioRpcError) -> DeepServeError:
    """Input errors keep their kind; anything else is the prefill side being unavailable."""
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Unavailable(f"prefill instance {address} timed out")
    error = error_from_rpc(exc)
    if isinstance(error, InvalidArgument | ResourceExhausted):
        error.message = f"prefill instance {address}: {error.message}"
        return error
    return Unavailable(f"prefill instance {address} failed: {error.message}")
