"""Tensors as raw bytes plus (dtype name, shape), for any torch dtype (bfloat16 included)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from itertools import product

import torch

from deepserve.errors import InvalidArgument

_DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.int64,
        torch.int32,
        torch.int8,
        torch.uint8,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
    )
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise InvalidArgument(f"unsupported KV dtype {name!r}", field="dtype") from None


def tensor_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's contents as a flat uint8 CPU view (a copy only if not contiguous)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8)


# Most pieces a strided tensor is sent or received as (one system call takes up to 1024);
# a layout that cuts finer than this is copied to one contiguous piece instead.
MAX_PIECES = 1024


def byte_runs(tensor: torch.Tensor) -> list[tuple[int, int]] | None:
    """The tensor's bytes as (offset into its storage, length) runs in C order, neighbours
    merged; None when it would take more than MAX_PIECES runs. A block-dim narrow of a
    [layers, 2, blocks, ...] tensor is layers * 2 runs (one if it spans every block)."""
    size = tensor.element_size()
    if tensor.numel() == 0:
        return []
    dims = [(n, stride) for n, stride in zip(tensor.shape, tensor.stride(), strict=True) if n != 1]
    inner, k = 1, len(dims)  # elements in one contiguous run; dims[:k] index the runs
    while k > 0 and dims[k - 1][1] == inner:
        inner *= dims[k - 1][0]
        k -= 1
    outer = dims[:k]
    if math.prod(n for n, _ in outer) > MAX_PIECES:
        return None
    runs: list[tuple[int, int]] = []
    strides = [stride for _, stride in outer]
    for index in product(*(range(n) for n, _ in outer)):
        element = tensor.storage_offset() + sum(map(int.__mul__, index, strides))
        offset = element * size
        if runs and runs[-1][0] + runs[-1][1] == offset:
            runs[-1] = (runs[-1][0], runs[-1][1] + inner * size)
        else:
            runs.append((offset, inner * size))
    return runs


def storage_view(tensor: torch.Tensor) -> memoryview:
    """Every byte of the tensor's storage (a CPU tensor), as a writable flat view that keeps
    the storage alive."""
    flat = torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage())
    return memoryview(flat.numpy())


def tensor_pieces(tensor: torch.Tensor) -> list[memoryview]:
    """The tensor's bytes in C order as views of its own memory (no copy), one per contiguous
    run; a CPU copy in one piece for a layout cut finer than MAX_PIECES or another device."""
    tensor = tensor.detach()
    runs = byte_runs(tensor) if tensor.device.type == "cpu" else None
    if runs is None:
        return [memoryview(tensor_bytes(tensor).numpy())]
    whole = storage_view(tensor)
    return [whole[offset : offset + n] for offset, n in runs]


def encode_tensor(tensor: torch.Tensor) -> tuple[bytes, str, list[int]]:
    """(raw bytes, dtype name, shape) of a tensor."""
    return tensor_bytes(tensor).numpy().tobytes(), dtype_name(tensor.dtype), list(tensor.shape)


def decode_tensor(data: bytes | memoryview, dtype: str, shape: Sequence[int]) -> torch.Tensor:
    """A read-only tensor over `data` (no copy): the receiver copies it into its cache anyway."""
    torch_dtype = dtype_from_name(dtype)
    expected = torch.Size(shape).numel() * torch.empty(0, dtype=torch_dtype).element_size()
    if len(data) != expected:
        raise InvalidArgument(
            f"KV payload has {len(data)} bytes, shape {list(shape)} of {dtype} needs {expected}",
            field="data",
        )
    if expected == 0:
        return torch.empty(tuple(shape), dtype=torch_dtype)
    with warnings.catch_warnings():
        # torch warns that the buffer is not writable; the tensor is only ever read.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(data, dtype=torch.uint8)
    return flat.view(torch_dtype).reshape(tuple(shape))
