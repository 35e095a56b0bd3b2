"""KV chunks to and from their protobuf form; the payload travels inline or as a shm handle."""

from __future__ import annotations

from deepserve.errors import InvalidArgument
from deepserve.flowserve.transfer.assembler import KVAssembler
from deepserve.flowserve.transfer.chunks import KVChunk
from deepserve.flowserve.transfer.codec import (
    decode_tensor,
    dtype_from_name,
    dtype_name,
    encode_tensor,
    tensor_pieces,
)
from deepserve.flowserve.transfer.landing import KVRoom
from deepserve.flowserve.transfer.shared_memory import SharedMemoryHandle, SharedMemoryPool
from deepserve.v1 import flowserve_pb2


def chunk_to_proto(
    chunk: KVChunk, shared_memory: SharedMemoryPool | None = None
) -> flowserve_pb2.KVChunk:
    """Inline bytes, or (with a pool) a handle to a shared-memory segment holding them."""
    msg = flowserve_pb2.KVChunk(
        first_block=chunk.first_block,
        num_blocks=chunk.num_blocks,
        layer_start=chunk.layer_start,
        num_layers=chunk.num_layers,
        total_layers=chunk.total_layers,
    )
    if shared_memory is not None:
        handle = shared_memory.put(chunk.tensor)
        msg.dtype, msg.shape[:] = handle.dtype, list(handle.shape)
        msg.shared_memory.path, msg.shared_memory.nbytes = handle.path, handle.nbytes
        return msg
    data, dtype, shape = encode_tensor(chunk.tensor)
    msg.dtype, msg.shape[:], msg.data = dtype, shape, data
    return msg


def chunk_meta_to_proto(chunk: KVChunk) -> tuple[flowserve_pb2.KVChunk, list[memoryview]]:
    """For KV over TCP: the message (metadata, `tcp_nbytes`) and the bytes sent beside it, in
    C order, as views of the chunk's own memory (a block-dim narrow is sent without a copy)."""
    pieces = tensor_pieces(chunk.tensor)
    msg = flowserve_pb2.KVChunk(
        first_block=chunk.first_block,
        num_blocks=chunk.num_blocks,
        layer_start=chunk.layer_start,
        num_layers=chunk.num_layers,
        total_layers=chunk.total_layers,
        dtype=dtype_name(chunk.tensor.dtype),
        shape=list(chunk.tensor.shape),
        tcp_nbytes=sum(p.nbytes for p in pieces),
    )
    return msg, pieces


def tcp_room(msg: flowserve_pb2.KVChunk, assembler: KVAssembler) -> KVRoom:
    """Where a TCP chunk's payload is read into: its slice of the assembler's landing tensor."""
    room = assembler.room(
        msg.first_block, msg.layer_start, msg.total_layers, dtype_from_name(msg.dtype), msg.shape
    )
    if room.nbytes != msg.tcp_nbytes:
        room.release()
        raise InvalidArgument(
            f"KV chunk of {msg.tcp_nbytes} bytes for shape {list(msg.shape)} of {msg.dtype}",
            field="tcp_nbytes",
        )
    return room


def chunk_from_proto(msg: flowserve_pb2.KVChunk) -> KVChunk:
    """The chunk's tensor (a shared-memory segment is claimed: mapped and unlinked)."""
    if msg.WhichOneof("payload") == "shared_memory":
        handle = SharedMemoryHandle(
            msg.shared_memory.path, msg.shared_memory.nbytes, msg.dtype, tuple(msg.shape)
        )
        tensor = SharedMemoryPool.take(handle)
    else:
        tensor = decode_tensor(msg.data, msg.dtype, list(msg.shape))
    return KVChunk(msg.first_block, msg.layer_start, msg.total_layers, tensor)


def segment_path(msg: flowserve_pb2.KVChunk) -> str | None:
    return msg.shared_memory.path if msg.WhichOneof("payload") == "shared_memory" else None
