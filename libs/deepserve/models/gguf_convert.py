"""Convert a llama-family GGUF file into a Hugging Face model directory (config, weights, tokenizer).

Weights are dequantized to float32 by default: the engine computes in float32 on CPU, the
dequantized values (fp16 scale x 4-bit code + fp16 min) are exact in float32, and a 135M model
is ~0.54 GB that way. bfloat16 halves the size but rounds every weight a second time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize

from deepserve.errors import InvalidArgument, Unimplemented
from deepserve.models.gguf_tokenizer import (
    build_tokenizer,
    stop_token_ids,
    tokenizer_config,
)
from deepserve.models.safetensors_stream import (
    SafetensorsStreamWriter,
    TensorSpec,
    WeightDType,
)

ProgressFn = Callable[[str], None]

# GGUF tensor name -> Hugging Face Llama name (per-layer names carry the layer index N).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(.+)")


def _check_head_rows(weight: np.ndarray, n_head: int) -> None:
    if n_head <= 0 or weight.shape[0] % (2 * n_head):
        raise ValueError(f"{weight.shape[0]} rows do not split into {n_head} heads of even size")


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k rows the way llama.cpp's HF->GGUF converter does (for tests and reference).

    Within each head, HF's rotary pairs row i with row i + head_dim/2; llama.cpp wants the pair
    on adjacent rows (2i, 2i+1).
    """
    _check_head_rows(weight, n_head)
    head_dim = weight.shape[0] // n_head
    return (
        weight.reshape(n_head, 2, head_dim // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def undo_llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Exact inverse of `llama_cpp_permute`: rows (2i, 2i+1) of each head go back to (i, i+d/2)."""
    _check_head_rows(weight, n_head)
    head_dim = weight.shape[0] // n_head
    return (
        weight.reshape(n_head, head_dim // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """All key/value metadata of a GGUF file as plain Python values (arrays become lists)."""
    return {
        name: field.contents()
        for name, field in reader.fields.items()
        if not name.startswith("GGUF.")
    }


def _float32_literal(value: float) -> float:
    # GGUF stores eps/theta as float32; 9.99999974e-06 should read back as the 1e-05 it was.
    return float(str(np.float32(value)))


def llama_config(
    metadata: Mapping[str, Any], *, tie_word_embeddings: bool, dtype: WeightDType
) -> dict[str, Any]:
    """A transformers LlamaConfig (config.json) from the `llama.*` GGUF metadata."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise Unimplemented(
            f"GGUF architecture {arch!r} is not supported yet (only 'llama')",
            field="general.architecture",
        )

    def required(key: str) -> int:
        if key not in metadata:
            raise InvalidArgument("missing from the GGUF metadata", field=key)
        return int(metadata[key])

    hidden_size = required("llama.embedding_length")
    n_head = required("llama.attention.head_count")
    n_kv_head = int(metadata.get("llama.attention.head_count_kv", n_head))
    head_dim = int(metadata.get("llama.attention.key_length", hidden_size // n_head))
    rotary_dim = int(metadata.get("llama.rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise Unimplemented(
            f"partial rotary embedding ({rotary_dim} of {head_dim} dims) is not supported",
            field="llama.rope.dimension_count",
        )
    scaling = metadata.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise Unimplemented(
            f"rope scaling {scaling!r} is not supported yet",
            field="llama.rope.scaling.type",
        )
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab_size = int(metadata.get("llama.vocab_size", len(tokens) if tokens else 0))
    if vocab_size <= 0:
        raise InvalidArgument("no vocabulary size in the GGUF metadata", field="llama.vocab_size")

    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": required("llama.feed_forward_length"),
        "num_hidden_layers": required("llama.block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv_head,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _float32_literal(
            metadata.get("llama.attention.layer_norm_rms_epsilon", 1e-5)
        ),
        "rope_theta": _float32_literal(metadata.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": required("llama.context_length"),
        "vocab_size": vocab_size,
        "tie_word_embeddings": tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    for name, key in (
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ):
        if metadata.get(key) is not None:
            config[name] = int(metadata[key])
    return config


def generation_config(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """generation_config.json: which ids start and stop a generation."""
    stops = stop_token_ids(metadata)
    config: dict[str, Any] = {}
    if metadata.get("tokenizer.ggml.bos_token_id") is not None:
        config["bos_token_id"] = int(metadata["tokenizer.ggml.bos_token_id"])
    if stops:
        config["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    if metadata.get("tokenizer.ggml.padding_token_id") is not None:
        config["pad_token_id"] = int(metadata["tokenizer.ggml.padding_token_id"])
    return config


@dataclass(frozen=True)
class _PlannedTensor:
    hf_name: str
    source: ReaderTensor
    shape: tuple[int, ...]
    # Set for q/k projections: the head count their rows were permuted with.
    unpermute_heads: int | None


def _expected_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    hidden = config["hidden_size"]
    q_rows = config["num_attention_heads"] * config["head_dim"]
    kv_rows = config["num_key_value_heads"] * config["head_dim"]
    inter = config["intermediate_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
    }
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    per_layer = {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q_rows, hidden),
        "self_attn.k_proj.weight": (kv_rows, hidden),
        "self_attn.v_proj.weight": (kv_rows, hidden),
        "self_attn.o_proj.weight": (hidden, q_rows),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }
    for layer in range(config["num_hidden_layers"]):
        for name, shape in per_layer.items():
            shapes[f"model.layers.{layer}.{name}"] = shape
    return shapes


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    raise Unimplemented(f"GGUF tensor {gguf_name!r} has no Llama equivalent here")


def _plan(tensors: list[ReaderTensor], config: Mapping[str, Any]) -> list[_PlannedTensor]:
    expected = _expected_shapes(config)
    planned: list[_PlannedTensor] = []
    for tensor in tensors:
        hf_name = _hf_name(tensor.name)
        # GGUF lists dimensions fastest-first (ne[0] = columns); numpy/torch list them slowest-first.
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        if hf_name not in expected:
            raise InvalidArgument(f"unexpected tensor {tensor.name} for this config")
        if shape != expected[hf_name]:
            raise InvalidArgument(
                f"tensor {tensor.name} has shape {shape}, config implies {expected[hf_name]}"
            )
        heads = None
        if hf_name.endswith("q_proj.weight"):
            heads = config["num_attention_heads"]
        elif hf_name.endswith("k_proj.weight"):
            heads = config["num_key_value_heads"]
        planned.append(_PlannedTensor(hf_name, tensor, shape, heads))
    missing = sorted(set(expected) - {p.hf_name for p in planned})
    if missing:
        raise InvalidArgument(f"GGUF lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return planned


def _write_json(path: Path, content: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf(
    gguf_path: Path,
    out_dir: Path,
    progress: ProgressFn | None = None,
    dtype: WeightDType = "float32",
) -> None:
    """Write config.json, model.safetensors, tokenizer files and generation_config.json."""
    emit = progress or (lambda _line: None)
    reader = GGUFReader(gguf_path)
    metadata = read_metadata(reader)
    tensors = list(reader.tensors)
    tied = all(t.name != "output.weight" for t in tensors)
    config = llama_config(metadata, tie_word_embeddings=tied, dtype=dtype)
    plan = _plan(tensors, config)
    tokenizer = build_tokenizer(metadata)

    out_dir.mkdir(parents=True, exist_ok=True)
    specs = [TensorSpec(p.hf_name, p.shape, dtype) for p in plan]
    with SafetensorsStreamWriter(out_dir / "model.safetensors", specs, {"format": "pt"}) as out:
        for done, item in enumerate(plan, start=1):
            weight = dequantize(item.source.data, item.source.tensor_type).reshape(item.shape)
            if item.unpermute_heads is not None:
                weight = undo_llama_cpp_permute(weight, item.unpermute_heads)
            out.write(item.hf_name, weight)
            emit(f"[convert] {done}/{len(plan)} tensors")

    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config(metadata))
    _write_json(out_dir / "generation_config.json", generation_config(metadata))
    # config.json last: a directory "holds a model" once it exists.
    _write_json(out_dir / "config.json", config)
