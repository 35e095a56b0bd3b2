"""The two ends of `bench.crosshost`, each run inside its own namespace host.

`serve` (on host a): a loaded model's weights behind the real fork RPC (`StreamWeights`, over
gRPC chunks or the bulk TCP channel), a KV-sized tensor behind a Prefill-shaped stream of real
KV wire chunks (the PD hand-off's gRPC encoding), and a plain socket that sends N bytes.
`fetch` (on host b): times each path, alternating, and prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import torch

from deepserve.flowserve.model.config import ModelConfig
from deepserve.flowserve.model.weights import load_llama_weights
from deepserve.flowserve.pod.fork import receive_weights
from deepserve.flowserve.pod.servicer import FlowServeServicer
from deepserve.flowserve.transfer.bulk_tcp import BulkOffer, StreamReceiver, StreamSender
from deepserve.flowserve.transfer.chunks import split_by_blocks
from deepserve.flowserve.transfer.wire import (
    chunk_from_proto,
    chunk_meta_to_proto,
    chunk_of,
    chunk_to_proto,
    tcp_room,
)
from deepserve.scaling.weights_cache import WeightsCacheLayout
from deepserve.v1 import flowserve_pb2, flowserve_pb2_grpc

KV_CHUNK_BYTES = 4 << 20
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 256 << 20),
    ("grpc.max_receive_message_length", 256 << 20),
]


class SourceShell:
    """What a fork source needs of a pod shell: one loaded model and its own address."""

    def __init__(self, model: str, weights: Any, host: str) -> None:
        self.model = model
        self.settings = SimpleNamespace(common=SimpleNamespace(host=host))
        runner = SimpleNamespace(model=SimpleNamespace(weights=weights))
        self.engine = SimpleNamespace(core=SimpleNamespace(executor=SimpleNamespace(runner=runner)))

    def require_engine(self, model: str) -> Any:
        return self.engine


class Source(FlowServeServicer):
    """StreamWeights from the real servicer; Prefill streams a fixed KV tensor as real chunks."""

    def __init__(self, shell: SourceShell, kv: torch.Tensor, host: str) -> None:
        super().__init__(shell)  # type: ignore[arg-type]
        self.kv = kv
        self.host = host

    async def Prefill(self, request: Any, context: Any) -> Any:
        """The hand-off's wire as `disagg.prefill_service` speaks it: gRPC bytes, or (asked
        for TCP) an offer, then each chunk's metadata in a message and its bytes on the
        socket."""
        chunks = split_by_blocks(self.kv, 0, KV_CHUNK_BYTES)
        if flowserve_pb2.KV_TRANSPORT_TCP not in request.transports:
            for chunk in chunks:
                yield flowserve_pb2.PrefillResponse(kv=chunk_to_proto(chunk))
            return
        stream = StreamSender(self.host)
        try:
            offer = stream.offer
            yield flowserve_pb2.PrefillResponse(
                kv_offer=flowserve_pb2.BulkOffer(address=offer.address, token=offer.token)
            )
            for chunk in chunks:
                meta, payload = chunk_meta_to_proto(chunk)
                stream.send(payload)
                yield flowserve_pb2.PrefillResponse(kv=meta)
            await stream.flush(60)
        finally:
            stream.close()


def socket_server(host: str, port: int, payload: memoryview) -> None:
    """Sends the payload to every connection, one at a time, then closes it."""
    listener = socket.create_server((host, port), backlog=8)
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)


async def serve(args: argparse.Namespace) -> None:
    config = ModelConfig.from_model_dir(Path(args.model))
    weights = load_llama_weights(Path(args.model), config)
    kv = torch.randn(args.kv_shape)
    payload = memoryview(bytearray(args.socket_bytes))
    threading.Thread(
        target=socket_server, args=(args.host, args.socket_port, payload), daemon=True
    ).start()
    server = grpc.aio.server(options=GRPC_OPTIONS)
    flowserve_pb2_grpc.add_FlowServeServiceServicer_to_server(
        Source(SourceShell(args.model, weights, args.host), kv, args.host), server
    )
    server.add_insecure_port(f"{args.host}:{args.grpc_port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def socket_copy(address: str, nbytes: int, into_shm: bool = False) -> float:
    """GB/s of one socket copy into fresh memory: anonymous, or (`into_shm`) a new file's
    mapping in /dev/shm, where a fork target writes (tmpfs pages are allocated as they fill)."""
    host, port = address.rsplit(":", 1)
    started = time.perf_counter()
    if into_shm:
        with tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="crosshost-") as f:
            os.ftruncate(f.fileno(), nbytes)
            with mmap.mmap(f.fileno(), nbytes) as mapping:
                room = memoryview(mapping)
                try:
                    _fill(host, int(port), room, nbytes)
                finally:
                    room.release()
        return nbytes / (time.perf_counter() - started) / 1e9
    room = _ROOM.setdefault(nbytes, memoryview(bytearray(b"\1" * nbytes)))
    started = time.perf_counter()
    _fill(host, int(port), room, nbytes)
    return nbytes / (time.perf_counter() - started) / 1e9


# The plain socket copy lands in memory already touched (allocated once, reused), like the KV
# paths' destination tensor: it measures the wire, not page allocation.
_ROOM: dict[int, memoryview] = {}


def _fill(host: str, port: int, room: memoryview, nbytes: int) -> None:
    with socket.create_connection((host, port)) as conn:
        filled = 0
        while filled < nbytes:
            with room[filled:] as rest:
                n = conn.recv_into(rest, nbytes - filled, socket.MSG_WAITALL)
            if n == 0:
                raise RuntimeError("socket closed early")
            filled += n


async def fork(address: str, model: str, bulk_tcp: bool) -> tuple[float, int]:
    root = Path(tempfile.mkdtemp(prefix="crosshost-fork-", dir="/dev/shm"))
    try:
        started = time.perf_counter()
        result = await receive_weights(
            address,
            model=model,
            model_dir=Path(model),
            layout=WeightsCacheLayout(root),
            dtype=torch.float32,
            timeout_s=600,
            shared_memory=False,
            bulk_tcp=bulk_tcp,
        )
        seconds = time.perf_counter() - started
        assert result.via == ("bulk tcp" if bulk_tcp else "stream"), result.via
        return result.nbytes / seconds / 1e9, result.nbytes
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def kv_handoff(address: str, dst: torch.Tensor, tcp: bool) -> float:
    """GB/s of one KV hand-off's transfer into place, as `disagg.decode_client` receives it."""
    nbytes = dst.numel() * dst.element_size()
    transports = [flowserve_pb2.KV_TRANSPORT_TCP] if tcp else [flowserve_pb2.KV_TRANSPORT_GRPC]
    stream: StreamReceiver | None = None
    reads: list[tuple[Any, Any, torch.Tensor, memoryview]] = []

    async def place(read: Any, msg: Any, tensor: torch.Tensor, room: memoryview) -> None:
        await read
        room.release()
        back = chunk_of(msg, tensor)
        dst.narrow(2, back.first_block, back.num_blocks).copy_(back.tensor)

    async with grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        stub = flowserve_pb2_grpc.FlowServeServiceStub(channel)
        started = time.perf_counter()
        try:
            async for reply in stub.Prefill(flowserve_pb2.PrefillRequest(transports=transports)):
                if reply.HasField("kv_offer"):
                    offer = reply.kv_offer
                    stream = await StreamReceiver.connect(
                        BulkOffer(offer.address, offer.token, 0), 30
                    )
                    continue
                if reply.kv.WhichOneof("payload") == "tcp_nbytes":
                    # As the decode side does: the read runs while the next message arrives.
                    assert stream is not None
                    tensor, room = tcp_room(reply.kv)
                    reads.append((stream.read_into(room), reply.kv, tensor, room))
                    if len(reads) > 1:
                        await place(*reads.pop(0))
                    continue
                back = chunk_from_proto(reply.kv)
                dst.narrow(2, back.first_block, back.num_blocks).copy_(back.tensor)
            while reads:
                await place(*reads.pop(0))
        finally:
            if stream is not None:
                stream.close()
        return nbytes / (time.perf_counter() - started) / 1e9


async def fetch(args: argparse.Namespace) -> None:
    host = args.source_host
    dst = torch.empty(args.kv_shape)
    rows: dict[str, list[float]] = {
        "socket": [], "socket_to_shm": [], "fork_grpc": [], "fork_tcp": [], "kv_grpc": [], "kv_tcp": []
    }  # fmt: skip
    weights_bytes = 0
    for _ in range(args.repeats):
        rows["socket"].append(
            await asyncio.to_thread(socket_copy, f"{host}:{args.socket_port}", args.socket_bytes)
        )
        rows["socket_to_shm"].append(
            await asyncio.to_thread(
                socket_copy, f"{host}:{args.socket_port}", args.socket_bytes, True
            )
        )
        rate, weights_bytes = await fork(f"{host}:{args.grpc_port}", args.model, bulk_tcp=False)
        rows["fork_grpc"].append(rate)
        rows["fork_tcp"].append((await fork(f"{host}:{args.grpc_port}", args.model, True))[0])
        rows["kv_grpc"].append(await kv_handoff(f"{host}:{args.grpc_port}", dst, tcp=False))
        rows["kv_tcp"].append(await kv_handoff(f"{host}:{args.grpc_port}", dst, tcp=True))
    print(
        json.dumps(
            {
                "gbps": rows,
                "weights_bytes": weights_bytes,
                "kv_bytes": dst.numel() * dst.element_size(),
                "socket_bytes": args.socket_bytes,
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("serve", "fetch"))
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="")
    parser.add_argument("--source-host", default="")
    parser.add_argument("--grpc-port", type=int, default=50061)
    parser.add_argument("--socket-port", type=int, default=50062)
    parser.add_argument("--socket-bytes", type=int, required=True)
    parser.add_argument("--kv-shape", type=lambda s: tuple(int(x) for x in s.split(",")))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(serve(args) if args.mode == "serve" else fetch(args))


if __name__ == "__main__":
    main()
