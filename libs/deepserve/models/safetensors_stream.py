"""Write a .safetensors file one tensor at a time, so peak memory is one tensor, not the model."""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np

WeightDType = Literal["float32", "bfloat16"]

_SAFETENSORS_DTYPE: dict[str, str] = {"float32": "F32", "bfloat16": "BF16"}
_ITEM_SIZE: dict[str, int] = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor, known before its data is computed."""

    name: str
    shape: tuple[int, ...]
    dtype: WeightDType

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _ITEM_SIZE[self.dtype]


def float32_to_bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (nearest, ties to even) and return the raw uint16 bits."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    # NaN must stay NaN: rounding could carry its mantissa into the exponent and make it Inf.
    is_nan = np.isnan(array)
    out = rounded.astype(np.uint16)
    out[is_nan] = 0x7FC0
    return out


class SafetensorsStreamWriter:
    """Writes the header from known specs first, then each tensor's bytes in spec order."""

    def __init__(self, path: Path, specs: Sequence[TensorSpec], metadata: dict[str, str]) -> None:
        self._specs = list(specs)
        self._next = 0
        header: dict[str, object] = {"__metadata__": metadata}
        offset = 0
        for spec in self._specs:
            header[spec.name] = {
                "dtype": _SAFETENSORS_DTYPE[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        # The format asks for the data section to start 8-byte aligned; pad the header with spaces.
        encoded += b" " * (-len(encoded) % 8)
        self._file: BinaryIO = path.open("wb")
        self._file.write(struct.pack("<Q", len(encoded)))
        self._file.write(encoded)

    def write(self, name: str, array: np.ndarray) -> None:
        """Append the next tensor; it must be the next spec by name and match its shape."""
        spec = self._specs[self._next]
        if name != spec.name or tuple(array.shape) != spec.shape:
            raise ValueError(
                f"expected tensor {spec.name} {spec.shape}, got {name} {tuple(array.shape)}"
            )
        if spec.dtype == "bfloat16":
            data = float32_to_bfloat16_bits(array)
        else:
            data = np.ascontiguousarray(array, dtype=np.float32)
        # safetensors is little-endian; numpy on every platform we run on is too.
        self._file.write(data.tobytes())
        self._next += 1

    def close(self) -> None:
        """Flush to disk; fails if some declared tensor was never written."""
        self._file.flush()
        self._file.close()
        if self._next != len(self._specs):
            raise ValueError(f"only {self._next} of {len(self._specs)} tensors were written")

    def __enter__(self) -> SafetensorsStreamWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()
