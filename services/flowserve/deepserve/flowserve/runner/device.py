"""Which accelerator the engine runs on (Ascend NPU, CUDA GPU or CPU) and its collective backend.

The platform is chosen once at start: an explicit argument wins, then the `DEEPSERVE_DEVICE`
environment variable, then the first available of npu, cuda, cpu. `torch_npu` is imported only
when it is installed, because importing it where no Ascend stack exists breaks torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Literal

import torch

from deepserve.errors import FailedPrecondition, InvalidArgument

DeviceKind = Literal["npu", "cuda", "cpu"]

DEVICE_ENV_VAR = "DEEPSERVE_DEVICE"
_BACKENDS: dict[str, str] = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


@dataclass(frozen=True, slots=True)
class DevicePlatform:
    """One kind of device plus what goes with it: collective backend, default dtype, per-rank device."""

    kind: DeviceKind
    # Device index for single-device use ("cuda:1"); tensor-parallel ranks use their rank instead.
    index: int | None = None

    @property
    def collective_backend(self) -> str:
        return _BACKENDS[self.kind]

    @property
    def default_dtype(self) -> torch.dtype:
        # CPUs lack fast bf16 matmuls on most hosts; accelerators are built for 16-bit.
        return torch.float32 if self.kind == "cpu" else torch.bfloat16

    @property
    def default_step_token_budget(self) -> int:
        # On CPU a 1024-token step already runs its matmuls at full speed (~1 s for a 135M
        # model), and a burst of prompts gets first tokens a step at a time instead of all at
        # the end of one long step. Smaller steps trade the other way: each prompt finished
        # early decodes one token per remaining prefill step. Served against vLLM (bench/
        # RESULTS.md, issue #19): 8 x 256-token prompts, TTFT p50 1.12x vLLM's at 2048 tokens,
        # 0.82x at 1024, 0.70x at 512; the mixed workload's TPOT p50 0.87x, 0.97x, 1.21x.
        # Accelerators need wide steps to fill the device.
        return 1024 if self.kind == "cpu" else 2048

    def device(self, rank: int | None = None) -> torch.device:
        """The torch device of tensor-parallel `rank` (or of the configured index)."""
        if self.kind == "cpu":
            return torch.device("cpu")
        index = rank if rank is not None else (self.index or 0)
        return torch.device(self.kind, index)

    def device_count(self) -> int:
        if self.kind == "cpu":
            return os.cpu_count() or 1
        return int(_torch_backend_module(self.kind).device_count())

    def set_current(self, rank: int) -> None:
        """Bind this process to its rank's device (needed before nccl/hccl init)."""
        if self.kind != "cpu":
            _torch_backend_module(self.kind).set_device(self.device(rank))

    def synchronize(self) -> None:
        if self.kind != "cpu":
            _torch_backend_module(self.kind).synchronize()


def npu_available() -> bool:
    """True when torch_npu is installed and sees at least one NPU."""
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        importlib.import_module("torch_npu")
    except Exception:  # a broken Ascend install must not stop CUDA/CPU serving
        return False
    return bool(getattr(torch, "npu", None) and torch.npu.is_available())


def detect_platform(requested: str | None = None) -> DevicePlatform:
    """Pick the platform: `requested` ("cpu", "cuda", "cuda:1", "npu"...), else env, else auto."""
    spec = requested if requested else os.environ.get(DEVICE_ENV_VAR, "").strip()
    if not spec or spec == "auto":
        if npu_available():
            return DevicePlatform("npu")
        if torch.cuda.is_available():
            return DevicePlatform("cuda")
        return DevicePlatform("cpu")
    kind, _, index_text = spec.partition(":")
    if kind not in _BACKENDS:
        raise InvalidArgument(
            f"unknown device {spec!r}; use npu, cuda, cpu or auto", field="device"
        )
    index: int | None = None
    if index_text:
        if not index_text.isdigit():
            raise InvalidArgument(f"bad device index in {spec!r}", field="device")
        index = int(index_text)
    if kind == "npu" and not npu_available():
        raise FailedPrecondition("device npu requested but torch_npu is missing or sees no NPU")
    if kind == "cuda" and not torch.cuda.is_available():
        raise FailedPrecondition("device cuda requested but torch sees no CUDA device")
    return DevicePlatform(kind, index)  # type: ignore[arg-type]


def platform_of(device: torch.device | str) -> DevicePlatform:
    """The platform a concrete torch device belongs to, without probing availability."""
    dev = torch.device(device)
    if dev.type not in _BACKENDS:
        raise InvalidArgument(f"unsupported device type {dev.type!r}", field="device")
    return DevicePlatform(dev.type, dev.index)  # type: ignore[arg-type]


def parse_dtype(dtype: torch.dtype | str | None, platform: DevicePlatform) -> torch.dtype:
    """Accept a torch dtype or its name ("float32", "bf16", ...); None -> the platform default."""
    if dtype is None:
        return platform.default_dtype
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
    }
    try:
        return aliases[dtype.lower().removeprefix("torch.")]
    except KeyError:
        raise InvalidArgument(f"unsupported dtype {dtype!r}", field="dtype") from None


def _torch_backend_module(kind: str):  # type: ignore[no-untyped-def]
    return torch.npu if kind == "npu" else torch.cuda  # type: ignore[attr-defined]
