"""DistFlow pieces alone: codec, chunking, reassembly, shared memory, proto form, and a
torch.distributed link between two real processes."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import pytest
import torch

from deepserve.errors import FailedPrecondition, InvalidArgument
from deepserve.flowserve.transfer import (
    KVAssembler,
    SharedMemoryPool,
    decode_tensor,
    encode_tensor,
    split_by_blocks,
    split_by_layers,
)
from deepserve.flowserve.transfer.torch_dist import DistKVLink
from deepserve.flowserve.transfer.wire import chunk_from_proto, chunk_to_proto
from deepserve.processes import free_port
from tests.unit.flowserve.kv_support import RecordingSink, kv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_codec_round_trips_every_dtype(dtype: torch.dtype) -> None:
    tensor = kv(dtype)
    data, name, shape = encode_tensor(tensor.transpose(0, 2))  # non-contiguous input
    back = decode_tensor(data, name, shape)
    assert back.dtype == dtype and torch.equal(back, tensor.transpose(0, 2))
    with pytest.raises(InvalidArgument):
        decode_tensor(data[:-1], name, shape)


@pytest.mark.parametrize("layerwise", [False, True])
async def test_chunks_reassemble_into_the_right_blocks(layerwise: bool) -> None:
    tensor = kv()
    per_block = tensor[:, :, :1].numel() * 4
    first = 2  # the receiver already holds blocks 0 and 1
    if layerwise:
        chunks = split_by_layers(tensor, first, max_bytes=2 * per_block // 3)
    else:
        chunks = split_by_blocks(tensor, first, max_bytes=2 * per_block)
    assert all(c.nbytes <= max(2 * per_block, per_block // 3 + 1) for c in chunks)
    sink = RecordingSink(tensor, first + 5)
    assembler = KVAssembler(sink, first, first + 5)
    for chunk in reversed(chunks):  # arrival order does not matter
        assert not assembler.complete
        await assembler.add(chunk)
    assert sink.writes == []  # buffered until the transfer ends
    await assembler.flush()
    assert assembler.complete and assembler.missing_blocks == []
    assert sink.writes == [(first, 5)]  # neighbouring runs merged into one write
    assert torch.equal(sink.data[:, :, first:], tensor)
    assert sink.data[:, :, :first].isnan().all()  # held blocks untouched
    assert assembler.bytes_received == tensor.numel() * 4
    with pytest.raises(InvalidArgument):
        await assembler.add(split_by_blocks(tensor, 0, 1 << 30)[0])  # blocks 0..4: out of range


async def test_incomplete_layerwise_transfer_is_not_complete() -> None:
    tensor = kv()
    chunks = split_by_layers(tensor, 0, max_bytes=1 << 30)
    sink = RecordingSink(tensor, 5)
    assembler = KVAssembler(sink, 0, 5)
    for chunk in chunks[:-1]:
        await assembler.add(chunk)
    await assembler.flush()
    assert not assembler.complete and sink.writes == []
    assert assembler.missing_blocks == [0, 1, 2, 3, 4]


def test_shared_memory_round_trip_and_ownership(tmp_path: Path) -> None:
    pool = SharedMemoryPool(tmp_path, ttl_s=60)
    tensor = kv(torch.bfloat16)
    handle = pool.put(tensor)
    assert Path(handle.path).exists() and pool.num_outstanding == 1
    back = SharedMemoryPool.take(handle)
    assert not Path(handle.path).exists()  # claimed: the name is gone, the mapping stays
    assert torch.equal(back, tensor) and pool.num_outstanding == 0
    with pytest.raises(FailedPrecondition):
        SharedMemoryPool.take(handle)
    discarded = pool.put(tensor)
    pool.discard([discarded.path])
    assert not Path(discarded.path).exists()
    with pytest.raises(InvalidArgument):
        SharedMemoryPool.take(type(handle)(str(tmp_path / "other"), 4, "float32", (1,)))


def test_unclaimed_segments_are_swept_after_their_ttl(tmp_path: Path) -> None:
    pool = SharedMemoryPool(tmp_path, ttl_s=0.0)
    handle = pool.put(kv())
    assert pool.sweep() == 1 and not Path(handle.path).exists()
    assert pool.sweep() == 0


@pytest.mark.parametrize("shared", [False, True], ids=["bytes", "shm"])
def test_proto_form_carries_bytes_or_a_segment(tmp_path: Path, shared: bool) -> None:
    tensor = kv(torch.float16)
    chunk = split_by_layers(tensor, 4, max_bytes=1 << 30)[1]
    pool = SharedMemoryPool(tmp_path) if shared else None
    msg = chunk_to_proto(chunk, pool)
    assert msg.WhichOneof("payload") == ("shared_memory" if shared else "data")
    assert (msg.first_block, msg.layer_start, msg.num_layers, msg.total_layers) == (4, 1, 1, 3)
    back = chunk_from_proto(type(msg).FromString(msg.SerializeToString()))
    assert torch.equal(back.tensor, chunk.tensor)
    assert (back.first_block, back.layer_start, back.total_layers) == (4, 1, 3)
    assert list(tmp_path.iterdir()) == []


def _receiver(port: int, conn: mp.connection.Connection) -> None:  # type: ignore[name-defined]
    """Rank 1 (decode side): receives each chunk its handle names and reassembles the KV."""
    torch.set_num_threads(1)
    link = DistKVLink.connect("127.0.0.1", port, rank=1, timeout_s=30)
    blocks = {}
    while (item := conn.recv()) is not None:
        first_block, layer, handle = item
        blocks[(first_block, layer)] = link.recv(handle)
    conn.send(({key: t.clone() for key, t in blocks.items()}, os.getpid()))


def test_torch_distributed_link_between_two_processes() -> None:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    port = free_port()
    proc = ctx.Process(target=_receiver, args=(port, child), daemon=True)
    proc.start()
    try:
        link = DistKVLink.connect("127.0.0.1", port, rank=0, timeout_s=30)
        tensor = kv(torch.bfloat16)
        chunks = split_by_layers(tensor, 1, max_bytes=1 << 30)
        for chunk in chunks:  # layer by layer: the handle travels on the control channel
            parent.send((chunk.first_block, chunk.layer_start, link.send(chunk.tensor)))
        parent.send(None)
        link.flush()
        assert parent.poll(60), "receiver gave no answer"
        received, pid = parent.recv()
        assert pid != os.getpid()
        for chunk in chunks:
            assert torch.equal(received[(chunk.first_block, chunk.layer_start)], chunk.tensor)
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
