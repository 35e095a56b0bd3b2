"""KV over TCP without copies: a chunk is sent as its tensor's contiguous runs and read
straight into its slice of the transfer's landing tensor, whose buffer serves the next
transfer; chunks that do not fit, and a source that stops early, are refused."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
from itertools import pairwise

import pytest
import torch

from deepserve.errors import InvalidArgument, Unavailable
from deepserve.flowserve.transfer import KVAssembler, split_by_blocks, split_by_layers
from deepserve.flowserve.transfer.bulk_tcp import (
    StreamReceiver,
    StreamSender,
    kernel_timeouts,
    recv_pieces,
    send_pieces,
)
from deepserve.flowserve.transfer.chunks import KVChunk
from deepserve.flowserve.transfer.codec import byte_runs, tensor_pieces
from deepserve.flowserve.transfer.landing import KVRoom, LandingPool
from deepserve.flowserve.transfer.wire import chunk_meta_to_proto, tcp_room
from tests.unit.flowserve.kv_support import RecordingSink, kv


def fill(room: KVRoom, chunk: KVChunk) -> None:
    """What the socket does: the chunk's bytes in C order, poured into the room's pieces."""
    data = chunk.tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    assert room.nbytes == len(data)
    at = 0
    for piece in room.pieces:
        piece[:] = data[at : at + piece.nbytes]
        at += piece.nbytes


def junk_pool() -> LandingPool:
    """A pool whose buffer holds junk (NaN in any float dtype): a byte that does not land
    where it should shows, whatever memory earlier tests left behind."""
    pool = LandingPool(keep_bytes=1 << 20)
    buffer = pool.take(1 << 20)
    buffer.fill_(0xFF)
    pool.give(buffer)
    return pool


def room_for(assembler: KVAssembler, chunk: KVChunk) -> KVRoom:
    msg, _ = chunk_meta_to_proto(chunk)
    return tcp_room(msg, assembler)


def test_a_block_slice_is_sent_as_its_runs_without_a_copy() -> None:
    tensor = kv()
    chunk = tensor.narrow(2, 1, 3)  # blocks 1..3 of every layer: 3 layers * (K, V) runs
    pieces = tensor_pieces(chunk)
    assert len(pieces) == 3 * 2
    assert b"".join(bytes(p) for p in pieces) == chunk.contiguous().numpy().tobytes()
    tensor[0, 0, 1, 0, 0, 0] = 42.0  # the pieces are views of the tensor's own memory
    assert torch.frombuffer(bytearray(pieces[0][:4]), dtype=torch.float32).item() == 42.0
    assert byte_runs(tensor.narrow(0, 1, 1)) == [(tensor[0].numel() * 4, tensor[0].numel() * 4)]
    # A layout cut finer than a system call takes goes as one contiguous copy.
    fine = torch.randn(64, 64, 2).transpose(0, 2)
    assert byte_runs(fine) is None
    assert len(tensor_pieces(fine)) == 1
    assert bytes(tensor_pieces(fine)[0]) == fine.contiguous().numpy().tobytes()


def test_pieces_cross_whole_through_partial_sends_and_reads() -> None:
    # Sockets with a timeout (as the KV stream's are) send and read what fits at a time.
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    data = random.Random(0).randbytes(6 << 20)

    def cut(points: list[int]) -> list[tuple[int, int]]:
        edges = [0, *points, len(data)]
        return list(pairwise(edges))

    sent = [memoryview(data)[x:y] for x, y in cut([3, 1000, 1 << 20, (1 << 20) + 7, 5 << 20])]
    rooms = [bytearray(y - x) for x, y in cut([1, 4096, 3 << 20])]
    sender = threading.Thread(target=send_pieces, args=(a, sent))
    sender.start()
    try:
        assert recv_pieces(b, [memoryview(r) for r in rooms])
    finally:
        sender.join(10)
        a.close()
    assert b"".join(rooms) == data
    assert not recv_pieces(b, [memoryview(bytearray(1))])  # closed: nothing more
    b.close()


def test_a_silent_peer_fails_the_read_after_the_kernel_timeout() -> None:
    a, b = socket.socketpair()
    kernel_timeouts(b, 0.2)  # blocking calls, the kernel's timeout
    try:
        assert b.gettimeout() is None
        a.sendall(b"abc")
        room = bytearray(8)
        with pytest.raises(OSError):  # 3 bytes, then silence
            recv_pieces(b, [memoryview(room)])
        assert room[:3] == b"abc"
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("layerwise", [False, True], ids=["block-chunks", "layer-chunks"])
async def test_chunks_land_at_their_blocks_and_layers(layerwise: bool) -> None:
    tensor = kv(torch.bfloat16)
    per_block = tensor[:, :, :1].numel() * 2
    first = 2  # the receiver already holds blocks 0 and 1
    if layerwise:
        chunks = split_by_layers(tensor, first, max_bytes=2 * per_block // 3)
        assert {c.num_layers for c in chunks} == {1} and {c.num_blocks for c in chunks} == {2, 1}
    else:
        chunks = split_by_blocks(tensor, first, max_bytes=2 * per_block)
        assert [c.num_blocks for c in chunks] == [2, 2, 1]
    sink = RecordingSink(tensor, first + 5)
    assembler = KVAssembler(sink, first, first + 5, junk_pool())
    for chunk in reversed(chunks):  # arrival order does not matter
        room = room_for(assembler, chunk)
        fill(room, chunk)
        assembler.landed(room)
    assert sink.writes == []  # written at flush
    await assembler.flush()
    assert assembler.complete and assembler.missing_blocks == []
    assert sink.writes == [(first, 5)]  # one write, straight from the landing tensor
    assert torch.equal(sink.data[:, :, first:], tensor.float())
    assert sink.data[:, :, :first].isnan().all()  # held blocks untouched
    assert assembler.bytes_received == tensor.numel() * 2


async def test_blocks_missing_a_layer_are_not_written() -> None:
    tensor = kv()
    chunks = split_by_layers(tensor, 0, max_bytes=2 * tensor[:1, :, :1].numel() * 4)
    sink = RecordingSink(tensor, 5)
    assembler = KVAssembler(sink, 0, 5, junk_pool())
    for chunk in chunks:
        if chunk.layer_start == 2 and chunk.first_block == 2:
            continue  # the last layer of blocks 2 and 3 never arrives
        room = room_for(assembler, chunk)
        fill(room, chunk)
        assembler.landed(room)
    await assembler.flush()
    assert sink.writes == [(0, 2), (4, 1)]
    assert not assembler.complete and assembler.missing_blocks == [2, 3]
    assert torch.equal(sink.data[:, :, :2], tensor[:, :, :2])
    assert torch.equal(sink.data[:, :, 4:], tensor[:, :, 4:])


async def test_a_finished_transfer_leaves_its_buffer_to_the_next() -> None:
    pool = LandingPool(keep_bytes=1 << 20)
    tensor = kv()
    pointers = []
    for _ in range(2):
        assembler = KVAssembler(RecordingSink(tensor, 5), 0, 5, pool)
        chunk = split_by_blocks(tensor, 0, 1 << 30)[0]
        room = room_for(assembler, chunk)
        pointers.append(room.pieces[0].obj.ctypes.data)  # type: ignore[union-attr]
        fill(room, chunk)
        assembler.landed(room)
        await assembler.flush()
        assert pool.kept_bytes == 0  # in use
        assembler.release()
        assert pool.kept_bytes >= tensor.numel() * 4
    assert pointers[0] == pointers[1]
    # Past the cap nothing is kept.
    small = LandingPool(keep_bytes=1024)
    small.give(small.take(tensor.numel() * 4))
    assert small.kept_bytes == 0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"dtype": torch.float16}, "shape"),
        ({"shape": (3, 2, 2, 4, 1, 8)}, "shape"),  # other heads than the transfer's
        ({"layer_start": 2}, "shape"),  # layers 2..4 of 3
        ({"first_block": 4}, "first_block"),  # blocks 4..5 of [0, 5)
        ({"total_layers": 4}, "total_layers"),
    ],
)
def test_a_chunk_that_does_not_fit_the_transfer_is_refused(
    change: dict[str, object], field: str
) -> None:
    assembler = KVAssembler(RecordingSink(kv(), 5), 0, 5)
    assembler.room(0, 0, 3, torch.float32, (3, 2, 2, 4, 2, 8))  # fixes the transfer's shape
    args: dict[str, object] = {
        "first_block": 2,
        "layer_start": 0,
        "total_layers": 3,
        "dtype": torch.float32,
        "shape": (3, 2, 2, 4, 2, 8),
    }
    args.update(change)
    with pytest.raises(InvalidArgument) as err:
        assembler.room(**args)  # type: ignore[arg-type]
    assert err.value.field == field


def test_a_message_whose_byte_count_does_not_match_its_shape_is_refused() -> None:
    assembler = KVAssembler(RecordingSink(kv(), 5), 0, 5)
    msg, _ = chunk_meta_to_proto(split_by_blocks(kv(), 0, 1 << 30)[0])
    msg.tcp_nbytes -= 4
    with pytest.raises(InvalidArgument) as err:
        tcp_room(msg, assembler)
    assert err.value.field == "tcp_nbytes"


async def test_strided_chunks_cross_a_real_socket_into_place() -> None:
    tensor = kv()
    chunks = split_by_blocks(tensor, 0, max_bytes=2 * tensor[:, :, :1].numel() * 4)
    sender = StreamSender("127.0.0.1")
    receiver = await StreamReceiver.connect(sender.offer, 10)
    sink = RecordingSink(tensor, 5)
    assembler = KVAssembler(sink, 0, 5, junk_pool())
    try:
        rooms = []
        for chunk in chunks:
            msg, pieces = chunk_meta_to_proto(chunk)
            assert len(pieces) == 3 * 2  # a block slice: sent from the tensor, not copied
            sender.send(pieces)
            room = tcp_room(type(msg).FromString(msg.SerializeToString()), assembler)
            rooms.append((receiver.read_into(room.pieces), room))
        await sender.flush(10)
        for read, room in rooms:
            await read
            assembler.landed(room)
        await assembler.flush()
    finally:
        sender.close()
        receiver.close()
    assert sink.writes == [(0, 5)]
    assert torch.equal(sink.data, tensor)


async def test_a_source_that_stops_mid_chunk_is_unavailable() -> None:
    tensor = kv()
    chunk = split_by_blocks(tensor, 0, 1 << 30)[0]
    sender = StreamSender("127.0.0.1")
    receiver = await StreamReceiver.connect(sender.offer, 10)
    assembler = KVAssembler(RecordingSink(tensor, 5), 0, 5)
    try:
        msg, pieces = chunk_meta_to_proto(chunk)
        sender.send(pieces[0][: pieces[0].nbytes // 2])  # half, then the source goes away
        await sender.flush(10)
        room = tcp_room(msg, assembler)
        read = receiver.read_into(room.pieces)
        sender.close()
        with pytest.raises(Unavailable, match="closed mid-transfer"):
            await asyncio.wait_for(read, 10)
    finally:
        sender.close()
        receiver.close()
