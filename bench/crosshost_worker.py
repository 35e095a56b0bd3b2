"""The two ends of `bench.crosshost`, each run inside its own namespace host.

`serve` (on host a): a loaded model's weights behind the real fork RPC (`StreamWeights`, over
gRPC chunks or the bulk TCP channel), a KV-sized tensor behind the real Prefill stream
(`disagg.prefill_service.serve_prefill`, gRPC bytes or TCP), and a plain socket that sends N
bytes. `fetch` (on host b): times each path, alternating (the KV hand-off through the real
`disagg.decode_client.GrpcPrefillSource`), and prints one JSON object.
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
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import torch

from deepserve.flowserve.disagg.decode_client import GrpcPrefillSource, PeerChannels
from deepserve.flowserve.disagg.prefill_flow import PrefillJob, PrefillOutcome
from deepserve.flowserve.disagg.prefill_service import serve_prefill
from deepserve.flowserve.engine.kv_handoff import KVReservation
from deepserve.flowserve.model.config import ModelConfig
from deepserve.flowserve.model.weights import load_llama_weights
from deepserve.flowserve.pod.fork import receive_weights
from deepserve.flowserve.pod.servicer import FlowServeServicer
from deepserve.flowserve.transfer.chunks import KVChunk, split_by_blocks
from deepserve.flowserve.transfer.landing import LandingPool
from deepserve.flowserve.transfer.settings import TransferSettings
from deepserve.flowserve.transfer.shared_memory import SharedMemoryPool
from deepserve.scaling.weights_cache import WeightsCacheLayout
from deepserve.v1 import common_pb2, flowserve_pb2, flowserve_pb2_grpc

BLOCK_SIZE = 16  # bench.crosshost's KV shape uses it
KV_CHUNK_BYTES = TransferSettings().max_chunk_bytes
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


class FixedKVServer:
    """A PrefillServer whose every job's KV is one fixed tensor (no model run): the chunks
    and outcome `disagg.prefill_service.serve_prefill` turns into the hand-off's wire."""

    def __init__(self, kv: torch.Tensor) -> None:
        self.kv = kv

    async def run(self, job: PrefillJob) -> AsyncIterator[KVChunk | PrefillOutcome]:
        chunks = split_by_blocks(self.kv, job.skip_blocks, KV_CHUNK_BYTES)
        for chunk in chunks:
            yield chunk
        yield PrefillOutcome(
            first_token_id=0,
            cached_tokens=0,
            blocks_sent=int(self.kv.shape[2]) - job.skip_blocks,
            bytes_sent=sum(c.nbytes for c in chunks),
            layerwise=False,
        )


class Source(FlowServeServicer):
    """StreamWeights from the real servicer; Prefill is the real `serve_prefill` over a fixed
    KV tensor (gRPC bytes, or with TCP asked for, an offer and the bytes on a socket)."""

    def __init__(self, shell: SourceShell, kv: torch.Tensor, host: str) -> None:
        super().__init__(shell)  # type: ignore[arg-type]
        self.server = FixedKVServer(kv)
        self.settings = TransferSettings(
            allow_shared_memory=False, tcp_bind_host=host, max_chunk_bytes=KV_CHUNK_BYTES
        )
        self.shared_memory = SharedMemoryPool(self.settings.shared_memory_dir)

    async def Prefill(self, request: Any, context: Any) -> Any:
        async for reply in serve_prefill(
            self.server,  # type: ignore[arg-type]
            request,
            None,
            self.settings,
            self.shared_memory,
        ):
            yield reply


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


# The decode side's settings, per transport asked for (the hosts are namespaces of one machine,
# so shared memory, which would be picked first, is off).
DECODE_SETTINGS = {
    tcp: TransferSettings(allow_shared_memory=False, allow_tcp=tcp) for tcp in (False, True)
}


class CopySink:
    """A KVSink that copies into a block-indexed tensor, as the engine's `load_from_host`
    copies into its cache."""

    def __init__(self, dst: torch.Tensor) -> None:
        self.dst = dst

    async def write(self, first_block: int, tensor: torch.Tensor) -> None:
        self.dst.narrow(2, first_block, int(tensor.shape[2])).copy_(tensor)


async def kv_handoff(
    peers: PeerChannels, address: str, dst: torch.Tensor, tcp: bool, landing: LandingPool
) -> float:
    """GB/s of one KV hand-off's transfer into place: the real `disagg.decode_client` source
    (its channel, settings and landing pool made once, as a decode instance's are), writing
    into `dst`."""
    nbytes = dst.numel() * dst.element_size()
    num_blocks = int(dst.shape[2])
    source = GrpcPrefillSource(
        peers,
        address,
        [0] * num_blocks * BLOCK_SIZE,
        model="bench",
        sampling=common_pb2.SamplingParams(),
        settings=DECODE_SETTINGS[tcp],
        layerwise=False,
        landing_pool=landing,
    )
    reservation = KVReservation(
        request_id="bench",
        block_ids=list(range(num_blocks)),
        num_held_blocks=0,
        num_prompt_tokens=num_blocks * BLOCK_SIZE,
        block_size=BLOCK_SIZE,
    )
    started = time.perf_counter()
    await source.prefill(reservation, CopySink(dst))
    seconds = time.perf_counter() - started
    assert source.done is not None
    want = flowserve_pb2.KV_TRANSPORT_TCP if tcp else flowserve_pb2.KV_TRANSPORT_GRPC
    assert source.done.transport == want, source.done.transport
    return nbytes / seconds / 1e9


async def fetch(args: argparse.Namespace) -> None:
    host = args.source_host
    dst = torch.empty(args.kv_shape)
    peers = PeerChannels()
    landing = LandingPool(TransferSettings().tcp_landing_keep_bytes)
    address = f"{host}:{args.grpc_port}"
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
        rows["kv_grpc"].append(await kv_handoff(peers, address, dst, False, landing))
        rows["kv_tcp"].append(await kv_handoff(peers, address, dst, True, landing))
    await peers.close()
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
