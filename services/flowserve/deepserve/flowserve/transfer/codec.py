"""Tensors as raw bytes plus (dtype name, shape), for any torch dtype (bfloat16 included)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

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
