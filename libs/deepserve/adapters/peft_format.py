"""PEFT's LoRA format (`adapter_config.json` + `adapter_model.safetensors`), checked without torch.

Registration (jobmgr) and the engine both read an adapter through `inspect_adapter`: the config's
rank, alpha and targets, and the tensor shapes from the safetensors header (a JSON prefix, so no
tensor is read). An adapter is refused, with the reason and the faulty field, when its rank is
over the platform's limit, its shapes do not fit the base model, or its files are malformed.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepserve.errors import InvalidArgument

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# The projections an adapter may target: every linear layer of a Llama-family decoder.
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTENTION_TARGETS + MLP_TARGETS
_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$"
)
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class BaseShape:
    """What an adapter must fit: the base model's layer count and projection sizes."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    q_size: int
    kv_size: int

    @classmethod
    def from_config_json(cls, model_dir: str | Path) -> BaseShape:
        raw = json.loads((Path(model_dir) / "config.json").read_text())
        raw = raw.get("text_config", raw)
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        head_dim = int(raw.get("head_dim") or hidden // heads)
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        return cls(
            num_layers=int(raw["num_hidden_layers"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            q_size=heads * head_dim,
            kv_size=kv_heads * head_dim,
        )

    def in_out(self, target: str) -> tuple[int, int]:
        """(in_features, out_features) of a target projection."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_size),
            "k_proj": (h, self.kv_size),
            "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }[target]


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    """A checked adapter: its rank, scaling, targets, and where each tensor is in the file."""

    path: Path
    rank: int
    alpha: float
    scaling: float
    targets: tuple[str, ...]
    base_model_name: str
    # (layer, target, "A" | "B") -> the tensor's name in the safetensors file.
    tensor_names: dict[tuple[int, str, str], str]

    @property
    def size_bytes(self) -> int:
        return (self.path / WEIGHTS_FILE).stat().st_size


def _refuse(message: str, field: str) -> InvalidArgument:
    return InvalidArgument(message, field=field)


def read_config(path: Path) -> dict[str, Any]:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise _refuse(f"{CONFIG_FILE} is missing", "adapter_config")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _refuse(f"{CONFIG_FILE} is not JSON: {exc}", "adapter_config") from exc
    if not isinstance(raw, dict):
        raise _refuse(f"{CONFIG_FILE} must be a JSON object", "adapter_config")
    return raw


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The header of a safetensors file: tensor name -> {dtype, shape, data_offsets}."""
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise _refuse(f"{WEIGHTS_FILE} is missing", "adapter_model")
    size = weights.stat().st_size
    with weights.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _refuse(f"{WEIGHTS_FILE} is not a safetensors file", "adapter_model")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise _refuse(f"{WEIGHTS_FILE} has a bad header length", "adapter_model")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _refuse(f"{WEIGHTS_FILE} header is not JSON", "adapter_model") from exc
    if not isinstance(header, dict):
        raise _refuse(f"{WEIGHTS_FILE} header must be an object", "adapter_model")
    header.pop("__metadata__", None)
    data_len = size - 8 - header_len
    for name, info in header.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise _refuse(f"{WEIGHTS_FILE}: tensor {name} lies outside the file", "adapter_model")
    return header


def inspect_adapter(path: str | Path, base: BaseShape, max_rank: int) -> AdapterSpec:
    """Check a PEFT LoRA adapter directory against its base model and the rank limit."""
    path = Path(path)
    raw = read_config(path)
    if str(raw.get("peft_type", "LORA")).upper() != "LORA":
        raise _refuse(f"peft_type {raw.get('peft_type')!r} is not LORA", "adapter_config")
    for flag, why in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out weights")):
        if raw.get(flag):
            raise _refuse(f"{why} is not supported", "adapter_config")
    if raw.get("bias", "none") != "none":
        raise _refuse("LoRA bias terms are not supported (bias must be 'none')", "adapter_config")
    if raw.get("modules_to_save"):
        raise _refuse("modules_to_save is not supported", "adapter_config")
    if raw.get("rank_pattern") or raw.get("alpha_pattern"):
        raise _refuse("rank_pattern and alpha_pattern are not supported", "adapter_config")
    rank = raw.get("r")
    if not isinstance(rank, int) or rank <= 0:
        raise _refuse(f"r must be a positive integer, got {rank!r}", "adapter_config.r")
    if rank > max_rank:
        raise _refuse(
            f"rank {rank} exceeds the limit of {max_rank} (DEEPSERVE_LORA_MAX_RANK)",
            "adapter_config.r",
        )
    alpha = raw.get("lora_alpha", rank)
    if not isinstance(alpha, int | float) or alpha <= 0:
        raise _refuse(f"lora_alpha must be positive, got {alpha!r}", "adapter_config.lora_alpha")
    scaling = alpha / math.sqrt(rank) if raw.get("use_rslora") else alpha / rank

    header = read_safetensors_header(path)
    names: dict[tuple[int, str, str], str] = {}
    for name, info in header.items():
        match = _KEY.match(name)
        if match is None:
            raise _refuse(f"tensor {name} is not a LoRA weight of a decoder layer", "adapter_model")
        layer, target, side = int(match[1]), match[3], match[4]
        if target not in TARGETS:
            raise _refuse(f"target {target} is not supported (one of {TARGETS})", "adapter_model")
        if not 0 <= layer < base.num_layers:
            raise _refuse(
                f"tensor {name}: layer {layer} but the base model has {base.num_layers}",
                "base_model",
            )
        in_f, out_f = base.in_out(target)
        expected = [rank, in_f] if side == "A" else [out_f, rank]
        if info.get("shape") != expected:
            raise _refuse(
                f"tensor {name} has shape {info.get('shape')}, the base model needs {expected}",
                "base_model",
            )
        if info.get("dtype") not in ("F32", "F16", "BF16"):
            raise _refuse(f"tensor {name} has dtype {info.get('dtype')}", "adapter_model")
        names[(layer, target, side)] = name
    if not names:
        raise _refuse(f"{WEIGHTS_FILE} holds no LoRA weights", "adapter_model")
    for layer, target, side in list(names):
        other = "B" if side == "A" else "A"
        if (layer, target, other) not in names:
            raise _refuse(
                f"layer {layer} {target} has lora_{side} but no lora_{other}", "adapter_model"
            )
    targets = tuple(t for t in TARGETS if any(k[1] == t for k in names))
    return AdapterSpec(
        path=path,
        rank=rank,
        alpha=float(alpha),
        scaling=float(scaling),
        targets=targets,
        base_model_name=str(raw.get("base_model_name_or_path") or ""),
        tensor_names=names,
    )
