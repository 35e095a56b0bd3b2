"""DistFlow: move KV tensors between memories and instances (gRPC bytes, shared memory,
torch.distributed), whole requests or layer by layer."""

from deepserve.flowserve.transfer.assembler import KVAssembler
from deepserve.flowserve.transfer.chunks import KVChunk, split_by_blocks, split_by_layers
from deepserve.flowserve.transfer.codec import decode_tensor, dtype_from_name, encode_tensor
from deepserve.flowserve.transfer.host import local_host_id
from deepserve.flowserve.transfer.settings import TransferSettings
from deepserve.flowserve.transfer.shared_memory import SharedMemoryHandle, SharedMemoryPool

__all__ = [
    "KVAssembler",
    "KVChunk",
    "SharedMemoryHandle",
    "SharedMemoryPool",
    "TransferSettings",
    "decode_tensor",
    "dtype_from_name",
    "encode_tensor",
    "local_host_id",
    "split_by_blocks",
    "split_by_layers",
]
