"""The Prefill RPC's body: PrefillRequest in, PrefillResponse stream out, over a PrefillServer."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from deepserve.flowserve.disagg.prefill_flow import (
    Heartbeat,
    PrefillJob,
    PrefillOutcome,
    PrefillServer,
)
from deepserve.flowserve.transfer.bulk_tcp import StreamSender
from deepserve.flowserve.transfer.host import local_host_id
from deepserve.flowserve.transfer.settings import TransferSettings
from deepserve.flowserve.transfer.shared_memory import SharedMemoryPool
from deepserve.flowserve.transfer.wire import chunk_meta_to_proto, chunk_to_proto, segment_path
from deepserve.v1 import flowserve_pb2

log = logging.getLogger(__name__)


def pick_transport(
    request: flowserve_pb2.PrefillRequest, settings: TransferSettings
) -> flowserve_pb2.KVTransport.ValueType:
    """The first of the caller's transports this side can do: shared memory when both allow
    it and share a host, TCP when this side has an address to offer it on; else gRPC bytes."""
    for transport in request.transports or [flowserve_pb2.KV_TRANSPORT_GRPC]:
        if transport == flowserve_pb2.KV_TRANSPORT_SHARED_MEMORY:
            if (
                settings.allow_shared_memory
                and request.host_id == local_host_id()
                and SharedMemoryPool.available(settings.shared_memory_dir)
            ):
                return transport
        elif transport == flowserve_pb2.KV_TRANSPORT_TCP:
            if settings.allow_tcp and settings.tcp_bind_host:
                return transport
        elif transport == flowserve_pb2.KV_TRANSPORT_GRPC:
            return transport
    return flowserve_pb2.KV_TRANSPORT_GRPC


async def serve_prefill(
    server: PrefillServer,
    request: flowserve_pb2.PrefillRequest,
    params: object,
    settings: TransferSettings,
    shared_memory: SharedMemoryPool,
) -> AsyncIterator[flowserve_pb2.PrefillResponse]:
    """Stream one prefill; segments of a transfer that did not complete are removed."""
    transport = pick_transport(request, settings)
    pool = shared_memory if transport == flowserve_pb2.KV_TRANSPORT_SHARED_MEMORY else None
    job = PrefillJob(
        request_id=request.request_id,
        prompt_token_ids=list(request.prompt_token_ids),
        sampling_params=params,  # type: ignore[arg-type]
        skip_blocks=request.skip_blocks,
        block_size=request.block_size,
        layerwise=request.mode == flowserve_pb2.KV_TRANSFER_MODE_LAYERWISE,
        cache_salt=request.cache_salt,
    )
    segments: list[str] = []
    completed = False
    stream: StreamSender | None = None
    if transport == flowserve_pb2.KV_TRANSPORT_TCP:
        stream = StreamSender(settings.tcp_bind_host)
        offer = stream.offer
        yield flowserve_pb2.PrefillResponse(
            kv_offer=flowserve_pb2.BulkOffer(address=offer.address, token=offer.token)
        )
    try:
        async for event in server.run(job):
            if isinstance(event, Heartbeat):
                yield flowserve_pb2.PrefillResponse(heartbeat=flowserve_pb2.PrefillHeartbeat())
                continue
            if isinstance(event, PrefillOutcome):
                if stream is not None:
                    # Every byte on the wire before the result that says all blocks were sent.
                    await stream.flush(settings.idle_timeout_s)
                completed = True
                yield flowserve_pb2.PrefillResponse(
                    done=flowserve_pb2.PrefillDone(
                        first_token_id=event.first_token_id,
                        cached_tokens=event.cached_tokens,
                        blocks_sent=event.blocks_sent,
                        bytes_sent=event.bytes_sent,
                        transport=transport,
                        layerwise=event.layerwise,
                    )
                )
                continue
            if stream is not None:
                # The metadata first: the receiver reads the bytes once it has it.
                meta, payload = chunk_meta_to_proto(event)
                stream.send(payload)  # queued: the bytes flow while the next chunk is made
                yield flowserve_pb2.PrefillResponse(kv=meta)
                continue
            chunk = chunk_to_proto(event, pool)
            path = segment_path(chunk)
            if path is not None:
                segments.append(path)
            yield flowserve_pb2.PrefillResponse(kv=chunk)
    finally:
        if stream is not None:
            stream.close()
        if not completed and segments:
            # The decode side will not claim them (it failed or went away).
            shared_memory.discard(segments)
