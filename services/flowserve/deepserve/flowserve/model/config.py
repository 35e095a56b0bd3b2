"""What the decoder needs from a Hugging Face `config.json` of the Llama family.

Reads Llama 2/3, SmolLM2, Mistral and Qwen2-style configs in both the classic layout
(`rope_theta` + `rope_scaling`) and the transformers 5 layout (`rope_parameters`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepserve.errors import InvalidArgument, NotFound

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
_SUPPORTED_ROPE_TYPES = frozenset({"linear", "llama3"})


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """A RoPE frequency rescaling (linear position interpolation or Llama 3.1's smooth scheme)."""

    rope_type: str
    factor: float
    # Only used by llama3.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shape and numerics of one Llama-family decoder."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    # q/k/v projections carry a bias (Qwen2; Llama with attention_bias).
    qkv_bias: bool
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    # Mistral's sliding window is recorded but not applied (full attention is used).
    sliding_window: int | None = None
    torch_dtype: str | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def check_tensor_parallel(self, tp_size: int) -> None:
        """Raise InvalidArgument unless heads, kv heads and the MLP split evenly over tp_size."""
        if tp_size < 1:
            raise InvalidArgument(f"tp_size must be >= 1, got {tp_size}", field="tp_size")
        for name, count in (
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("intermediate_size", self.intermediate_size),
        ):
            if count % tp_size:
                raise InvalidArgument(
                    f"{name}={count} is not divisible by tp_size={tp_size}", field="tp_size"
                )

    @classmethod
    def from_model_dir(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` (and `generation_config.json` for extra eos ids) from a model dir."""
        model_dir = Path(path)
        config_path = model_dir / "config.json"
        if not config_path.is_file():
            raise NotFound(f"no config.json in {model_dir}", field="model_dir")
        raw = json.loads(config_path.read_text())
        generation_path = model_dir / "generation_config.json"
        generation = json.loads(generation_path.read_text()) if generation_path.is_file() else {}
        return cls.from_dict(raw, generation)

    @classmethod
    def from_dict(
        cls, raw: dict[str, Any], generation: dict[str, Any] | None = None
    ) -> ModelConfig:
        model_type = str(raw.get("model_type", ""))
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise InvalidArgument(
                f"model_type {model_type!r} is not supported; expected one of "
                f"{sorted(SUPPORTED_MODEL_TYPES)}",
                field="model_type",
            )
        activation = raw.get("hidden_act", "silu")
        if activation != "silu":
            raise InvalidArgument(f"hidden_act {activation!r} is not supported", field="hidden_act")
        try:
            hidden = int(raw["hidden_size"])
            num_heads = int(raw["num_attention_heads"])
            vocab_size = int(raw["vocab_size"])
            intermediate = int(raw["intermediate_size"])
            num_layers = int(raw["num_hidden_layers"])
        except KeyError as exc:
            raise InvalidArgument(f"config.json lacks {exc.args[0]}", field=exc.args[0]) from None
        num_kv_heads = int(raw.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv_heads:
            raise InvalidArgument(
                f"num_attention_heads={num_heads} is not a multiple of "
                f"num_key_value_heads={num_kv_heads}",
                field="num_key_value_heads",
            )
        head_dim = int(raw.get("head_dim") or hidden // num_heads)
        rope_theta, rope_scaling = _parse_rope(raw)
        qkv_bias = bool(raw.get("attention_bias", False)) or model_type == "qwen2"
        sliding_window = raw.get("sliding_window") if raw.get("use_sliding_window", True) else None
        return cls(
            model_type=model_type,
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            eos_token_ids=_eos_ids(raw, generation or {}),
            bos_token_id=raw.get("bos_token_id"),
            sliding_window=int(sliding_window) if sliding_window else None,
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        )


def _parse_rope(raw: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers 5 folds theta and scaling into `rope_parameters`; older files split them.
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling: dict[str, Any] | None = params
    else:
        theta = float(raw.get("rope_theta", 10000.0))
        scaling = raw.get("rope_scaling")
    if not scaling:
        return theta, None
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type == "default":
        return theta, None
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise InvalidArgument(
            f"rope type {rope_type!r} is not supported; supported: {sorted(_SUPPORTED_ROPE_TYPES)}",
            field="rope_scaling",
        )
    try:
        factor = float(scaling["factor"])
    except KeyError:
        raise InvalidArgument(f"{rope_type} rope needs a factor", field="rope_scaling") from None
    if rope_type == "linear":
        return theta, RopeScaling("linear", factor)
    original = scaling.get("original_max_position_embeddings")
    if original is None:
        original = raw.get("max_position_embeddings", 8192)
    return theta, RopeScaling(
        "llama3",
        factor,
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(original),
    )


def _eos_ids(raw: dict[str, Any], generation: dict[str, Any]) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (raw.get("eos_token_id"), generation.get("eos_token_id")):
        for value in source if isinstance(source, list) else [source]:
            if value is not None and int(value) not in ids:
                ids.append(int(value))
    return tuple(ids)
