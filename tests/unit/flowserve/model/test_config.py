"""ModelConfig parsing of Llama-family config.json files, old and new layouts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from deepserve.errors import InvalidArgument, NotFound
from deepserve.flowserve.model.config import ModelConfig, RopeScaling

SMOLLM2_LIKE: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000,
    "rope_scaling": None,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
    "eos_token_id": 2,
    "bos_token_id": 1,
    "torch_dtype": "bfloat16",
}


def _write(tmp_path: Path, raw: dict[str, Any], generation: dict[str, Any] | None = None) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(raw))
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return tmp_path


def test_classic_llama_layout(tmp_path: Path) -> None:
    config = ModelConfig.from_model_dir(_write(tmp_path, SMOLLM2_LIKE, {"eos_token_id": [2, 7]}))
    assert config.head_dim == 64  # derived: 576 / 9
    assert (config.num_heads, config.num_kv_heads, config.num_layers) == (9, 3, 30)
    assert config.rope_theta == 100000.0 and config.rope_scaling is None
    assert config.tie_word_embeddings and not config.qkv_bias
    assert config.eos_token_ids == (2, 7)
    assert config.rms_norm_eps == 1e-5 and config.max_position_embeddings == 8192
    assert config.torch_dtype == "bfloat16"


def test_transformers5_rope_parameters_layout(tmp_path: Path) -> None:
    raw = {
        **SMOLLM2_LIKE,
        "head_dim": 32,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    del raw["rope_theta"]
    config = ModelConfig.from_model_dir(_write(tmp_path, raw))
    assert config.head_dim == 32  # explicit wins over hidden / heads
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)


@pytest.mark.parametrize("key", ["type", "rope_type"])
def test_linear_rope_scaling_either_key(key: str) -> None:
    config = ModelConfig.from_dict({**SMOLLM2_LIKE, "rope_scaling": {key: "linear", "factor": 2}})
    assert config.rope_scaling == RopeScaling("linear", 2.0)


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "su"])
def test_unsupported_rope_type_names_rope_scaling(rope_type: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        ModelConfig.from_dict({**SMOLLM2_LIKE, "rope_scaling": {"type": rope_type, "factor": 2}})
    assert info.value.field == "rope_scaling"


def test_qwen2_has_qkv_bias_and_llama_attention_bias_flag() -> None:
    assert ModelConfig.from_dict({**SMOLLM2_LIKE, "model_type": "qwen2"}).qkv_bias
    assert ModelConfig.from_dict({**SMOLLM2_LIKE, "attention_bias": True}).qkv_bias


def test_mistral_records_sliding_window() -> None:
    config = ModelConfig.from_dict(
        {**SMOLLM2_LIKE, "model_type": "mistral", "sliding_window": 4096}
    )
    assert config.sliding_window == 4096


def test_rejects_other_families_and_activations(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as info:
        ModelConfig.from_dict({**SMOLLM2_LIKE, "model_type": "gpt2"})
    assert info.value.field == "model_type"
    with pytest.raises(InvalidArgument):
        ModelConfig.from_dict({**SMOLLM2_LIKE, "hidden_act": "gelu"})
    with pytest.raises(NotFound):
        ModelConfig.from_model_dir(tmp_path)


def test_tensor_parallel_divisibility() -> None:
    config = ModelConfig.from_dict(SMOLLM2_LIKE)
    config.check_tensor_parallel(1)
    config.check_tensor_parallel(3)  # 9 heads, 3 kv heads, 1536 MLP columns
    with pytest.raises(InvalidArgument) as info:
        config.check_tensor_parallel(2)  # 3 kv heads cannot split in two
    assert info.value.field == "tp_size"
