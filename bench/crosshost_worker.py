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
from deepserve.flowserve.transfer.bulk_tcp import BulkSender, receive
from deepserve.flowserve.transfer.chunks import split_by_blocks
from deepserve.flowserve.transfer.wire import chunk_from_proto, chunk_to_proto
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
        for chunk in split_by_blocks(self.kv, 0, KV_CHUNK_BYTES):
            yield flowserve_pb2.PrefillResponse(kv=chunk_to_proto(chunk))


def socket_server(host: str, port: int, payload: memoryview) -> None:
    """Sends the payload to every connection, one at a time, then closes it."""
    listener = socket.create_server((host, port), backlog=8)
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)


def kv_offer_server(host: str, port: int, kv: torch.Tensor) -> None:
    """Per connection: a fresh bulk TCP offer of the KV bytes (address, token, size)."""
    listener = socket.create_server((host, port), backlog=8)
    payload = memoryview(kv.reshape(-1).view(torch.uint8).numpy())
    while True:
        conn, _ = listener.accept()
        sender = BulkSender(host, [payload])
        with conn:
            offer = sender.offer
            conn.sendall(
                json.dumps(
                    {"address": offer.address, "token": offer.token.hex(), "nbytes": offer.nbytes}
                ).encode()
                + b"\n"
            )
        asyncio.run(sender.serve(60))


async def serve(args: argparse.Namespace) -> None:
    config = ModelConfig.from_model_dir(Path(args.model))
    weights = load_llama_weights(Path(args.model), config)
    kv = torch.randn(args.kv_shape)
    payload = memoryview(bytearray(args.socket_bytes))
    threading.Thread(
        target=socket_server, args=(args.host, args.socket_port, payload), daemon=True
    ).start()
    threading.Thread(
        target=kv_offer_server, args=(args.host, args.kv_port, kv), daemon=True
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


async def kv_grpc(address: str, dst: torch.Tensor) -> float:
    nbytes = dst.numel() * dst.element_size()
    async with grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        stub = flowserve_pb2_grpc.FlowServeServiceStub(channel)
        started = time.perf_counter()
        async for reply in stub.Prefill(flowserve_pb2.PrefillRequest()):
            back = chunk_from_proto(reply.kv)
            dst.narrow(2, back.first_block, back.num_blocks).copy_(back.tensor)
        return nbytes / (time.perf_counter() - started) / 1e9


async def kv_tcp(address: str, dst: torch.Tensor) -> float:
    from deepserve.flowserve.transfer.bulk_tcp import BulkOffer

    host, port = address.rsplit(":", 1)
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, int(port))
    line = json.loads(await reader.readline())
    writer.close()
    offer = BulkOffer(line["address"], bytes.fromhex(line["token"]), line["nbytes"])
    view = memoryview(dst.reshape(-1).view(torch.uint8).numpy())
    await receive(offer, [view], 60)
    view.release()
    return offer.nbytes / (time.perf_counter() - started) / 1e9


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
        rows["kv_grpc"].append(await kv_grpc(f"{host}:{args.grpc_port}", dst))
        rows["kv_tcp"].append(await kv_tcp(f"{host}:{args.kv_port}", dst))
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
    parser.add_argument("--kv-port", type=int, default=50063)
    parser.add_argument("--socket-bytes", type=int, required=True)
    parser.add_argument("--kv-shape", type=lambda s: tuple(int(x) for x in s.split(",")))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(serve(args) if args.mode == "serve" else fetch(args))


if __name__ == "__main__":
    main()
