"""Prepared weights: one rank's fused, device-dtype tensors in one file that instances map.

The DRAM copies of podpool (DRAM pre-loading) and the weights a fork target receives from a
running instance are both stored in this form under the host's weights cache
(`deepserve.scaling.weights_cache`). Loading from it skips the safetensors read, the q/k/v and
gate/up fusion and the dtype conversion: on the CPU the model's tensors *are* views of the
mapped file (zero-copy, and every instance on the host shares its pages); on an accelerator
it costs one host-to-device copy.

A rank file is `MAGIC`, an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and offset, then the tensors, each aligned to `ALIGN` bytes. It is mapped
copy-on-write, so a stray in-place write would touch a private page, never the shared copy.

`python -m deepserve.flowserve.model.prepared_weights --model-dir DIR ...` prepares a copy (podpool runs
it in a subprocess so that its own process never holds weights).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import mmap
import os
import struct
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from deepserve.errors import FailedPrecondition, InvalidArgument
from deepserve.flowserve.model.checkpoint import read_checkpoint
from deepserve.flowserve.model.config import ModelConfig
from deepserve.flowserve.model.llama_weights import DecoderLayerWeights, LlamaWeights
from deepserve.scaling.weights_cache import (
    WeightsCacheLayout,
    WeightsEntry,
    is_prepared_dir,
    rank_file_name,
    read_entry,
)

MAGIC = b"DSWTS001"
ALIGN = 64
_LAYER_FIELDS = tuple(f.name for f in dataclasses.fields(DecoderLayerWeights))
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise InvalidArgument(f"unsupported weight dtype {name!r}", field="dtype") from None


@dataclass(frozen=True, slots=True)
class TensorSlot:
    """Where one tensor lies in a rank's byte range (offset from the data start)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


# --- LlamaWeights <-> named tensors ---------------------------------------------------------


def flatten_llama_weights(weights: LlamaWeights) -> dict[str, torch.Tensor]:
    """Named tensors of one rank; a tied lm_head (the embed tensor itself) is left out."""
    named: dict[str, torch.Tensor] = {"embed": weights.embed, "final_norm": weights.final_norm}
    if weights.lm_head is not None and weights.lm_head is not weights.embed:
        named["lm_head"] = weights.lm_head
    for i, layer in enumerate(weights.layers):
        for field in _LAYER_FIELDS:
            tensor = getattr(layer, field)
            if tensor is not None:
                named[f"layers.{i}.{field}"] = tensor
    return named


def unflatten_llama_weights(
    named: dict[str, torch.Tensor], *, num_layers: int, tp_rank: int
) -> LlamaWeights:
    layers = []
    for i in range(num_layers):
        values = {f: named.get(f"layers.{i}.{f}") for f in _LAYER_FIELDS}
        missing = [f for f in ("input_norm", "qkv", "o_proj", "post_norm", "gate_up", "down")
                   if values[f] is None]  # fmt: skip
        if missing:
            raise FailedPrecondition(f"prepared weights lack layers.{i}.{missing[0]}")
        layers.append(DecoderLayerWeights(**values))  # type: ignore[arg-type]
    embed = named["embed"]
    lm_head = named.get("lm_head", embed) if tp_rank == 0 else None
    return LlamaWeights(embed=embed, layers=layers, final_norm=named["final_norm"], lm_head=lm_head)


# --- rank files -----------------------------------------------------------------------------


def plan_layout(named: dict[str, torch.Tensor]) -> tuple[list[TensorSlot], int]:
    """Each tensor's aligned offset in one byte range, and the range's total size."""
    slots: list[TensorSlot] = []
    offset = 0
    for name, tensor in named.items():
        nbytes = tensor.numel() * tensor.element_size()
        slots.append(
            TensorSlot(name, dtype_name(tensor.dtype), tuple(tensor.shape), offset, nbytes)
        )
        offset = _align(offset + nbytes)
    return slots, offset


def _header_bytes(slots: Iterable[TensorSlot]) -> bytes:
    header = {
        "tensors": [
            {"name": s.name, "dtype": s.dtype, "shape": list(s.shape), "offset": s.offset,
             "nbytes": s.nbytes}
            for s in slots
        ]
    }  # fmt: skip
    return json.dumps(header).encode()


def _data_start(header: bytes) -> int:
    return _align(len(MAGIC) + 8 + len(header))


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's bytes without a copy when it is contiguous on the CPU."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


class RankFileWriter:
    """Creates a rank file of a known layout and fills its data range (possibly in pieces).

    Writes with `pwrite`, not through a mapping: into fresh tmpfs pages the kernel then
    allocates and fills each page in one pass, with no page fault per 4 KiB. On a VM, where the
    first touch of guest memory dominates, this is what bounds a same-host fork (see
    bench/fresh_copy.py)."""

    def __init__(self, path: Path, slots: list[TensorSlot], total_bytes: int) -> None:
        self.path = path
        self.slots = slots
        self.total_bytes = total_bytes
        header = _header_bytes(slots)
        self._data_start = _data_start(header)
        self._fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.ftruncate(self._fd, max(self._data_start + total_bytes, 1))
            self._pwrite(MAGIC + struct.pack("<Q", len(header)) + header, 0)
        except BaseException:
            os.close(self._fd)
            raise
        self.written = 0

    def _pwrite(self, data: bytes | memoryview, position: int) -> None:
        view = memoryview(data).cast("B")
        while view:
            done = os.pwrite(self._fd, view, position)
            view, position = view[done:], position + done

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Writes bytes at `offset` of the data range."""
        end = offset + len(data)
        if offset < 0 or end > self.total_bytes:
            raise InvalidArgument(
                f"chunk [{offset}, {end}) outside the {self.total_bytes}-byte range",
                field="offset",
            )
        self._pwrite(data, self._data_start + offset)
        self.written += len(data)

    def write_tensors(self, named: dict[str, torch.Tensor]) -> None:
        for slot in self.slots:
            self.write(slot.offset, tensor_bytes(named[slot.name]))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def write_rank_file(path: Path, named: dict[str, torch.Tensor]) -> int:
    """Writes the tensors as one rank file; returns the data bytes."""
    slots, total = plan_layout(named)
    writer = RankFileWriter(path, slots, total)
    try:
        writer.write_tensors(named)
    finally:
        writer.close()
    return total


# madvise(MADV_POPULATE_READ), Linux 5.14+: fills the page tables of a mapping in one call
# without writing (a copy-on-write mapping stays shared). Python 3.11 lacks the name.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


def _populate(mapped: mmap.mmap) -> None:
    """Maps every page now: one bulk call (~30 ms for 538 MB) instead of ~130k first-touch
    faults during the warm-up forward (~45 ms). Best effort: older kernels refuse it."""
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, ValueError):
        mapped.madvise(_MADV_POPULATE_READ)


def map_rank_file(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors as views of one copy-on-write mapping (no bytes are copied)."""
    with path.open("rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise FailedPrecondition(f"{path} is not a prepared weights file")
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        data_start = _align(len(MAGIC) + 8 + header_len)
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    _populate(mapped)
    named: dict[str, torch.Tensor] = {}
    for item in header["tensors"]:
        dtype = dtype_from_name(item["dtype"])
        shape = tuple(item["shape"])
        if item["nbytes"] == 0:
            named[item["name"]] = torch.empty(shape, dtype=dtype)
            continue
        flat = torch.frombuffer(
            mapped, dtype=torch.uint8, count=item["nbytes"], offset=data_start + item["offset"]
        )
        named[item["name"]] = flat.view(dtype).reshape(shape)
    return named


# --- loading and preparing ------------------------------------------------------------------


def open_prepared(
    model_dir: str | Path,
    config: ModelConfig,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    tp_rank: int,
    tp_size: int,
) -> LlamaWeights | None:
    """This rank's weights when `model_dir` is a prepared copy, else None (read the disk).

    On the CPU the tensors stay views of the shared mapping; elsewhere they are copied once.
    """
    path = Path(model_dir)
    if not is_prepared_dir(path):
        return None
    entry = read_entry(path)
    assert entry is not None
    if entry.tp_size != tp_size or entry.dtype != dtype_name(dtype):
        raise FailedPrecondition(
            f"prepared weights in {path} are {entry.dtype} tp{entry.tp_size}, "
            f"this rank needs {dtype_name(dtype)} tp{tp_size}"
        )
    from deepserve.flowserve.model.premapped import premapped

    rank_path = entry.rank_path(tp_rank)
    named = premapped.get(rank_path) or map_rank_file(rank_path)
    target = torch.device(device)
    if target.type != "cpu":
        named = {name: t.to(target, non_blocking=True) for name, t in named.items()}
    return unflatten_llama_weights(named, num_layers=config.num_layers, tp_rank=tp_rank)


def prepare_copy(
    model: str,
    model_dir: Path,
    layout: WeightsCacheLayout,
    *,
    dtype: torch.dtype,
    tp_size: int = 1,
    origin: str = "preload",
) -> WeightsEntry:
    """Reads the model from disk once per rank and publishes its prepared copy on this host."""
    existing = layout.find(model_dir, dtype_name(dtype), tp_size)
    if existing is not None:
        return existing
    config = ModelConfig.from_model_dir(model_dir)
    config.check_tensor_parallel(tp_size)
    staging = layout.new_staging_dir()
    total = 0
    try:
        for rank in range(tp_size):
            weights = read_checkpoint(
                model_dir, config, device="cpu", dtype=dtype, tp_rank=rank, tp_size=tp_size
            )
            total += write_rank_file(
                staging / rank_file_name(rank, tp_size), flatten_llama_weights(weights)
            )
            del weights
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise
    return layout.publish(
        staging,
        model=model,
        model_dir=model_dir,
        dtype=dtype_name(dtype),
        tp_size=tp_size,
        nbytes=total,
        origin=origin,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prepare a model's weights in host memory.")
    parser.add_argument("--model", required=True, help="catalog name or path (recorded)")
    parser.add_argument("--model-dir", required=True, type=Path)
    parser.add_argument("--root", required=True, type=Path, help="the host's weights cache")
    parser.add_argument("--device", default="", help="the pods' device; picks the dtype")
    parser.add_argument("--tp-size", type=int, default=1)
    # The pods' dtype when this process runs without their device (a Kubernetes node agent).
    parser.add_argument("--dtype", default="", help="overrides the device's default dtype")
    args = parser.parse_args(argv)
    from deepserve.flowserve.runner.device import detect_platform

    torch.set_num_threads(1)  # a background job: leave the cores to the serving pods
    started = time.monotonic()
    if args.dtype:
        dtype = dtype_from_name(args.dtype)
    else:
        dtype = detect_platform(args.device or None).default_dtype
    entry = prepare_copy(
        args.model, args.model_dir, WeightsCacheLayout(args.root), dtype=dtype,
        tp_size=args.tp_size,
    )  # fmt: skip
    print(json.dumps({"path": str(entry.path), "nbytes": entry.nbytes,
                      "seconds": round(time.monotonic() - started, 3)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
