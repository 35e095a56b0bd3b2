"""Checkpoint loading: shards per tensor-parallel rank, fused projections, multi-file checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deepserve.errors import InvalidArgument
from deepserve.flowserve.model.checkpoint import SafetensorsCheckpoint
from deepserve.flowserve.model.config import ModelConfig
from deepserve.flowserve.model.weights import load_llama_weights
from tests.unit.flowserve.runner.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny"), family="qwen2")


def _full(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def test_each_rank_holds_only_its_shard(tiny_dir: Path) -> None:
    config = ModelConfig.from_model_dir(tiny_dir)
    full = _full(tiny_dir)
    head_dim = config.head_dim  # 16; 4 q heads, 2 kv heads
    for rank in range(2):
        weights = load_llama_weights(tiny_dir, config, tp_rank=rank, tp_size=2)
        layer = weights.layers[1]
        # This rank's 2 q heads, 1 k head, 1 v head; half the MLP columns.
        assert layer.qkv.shape == ((2 + 1 + 1) * head_dim, 64)
        assert layer.o_proj.shape == (64, 2 * head_dim)
        assert layer.gate_up.shape == (2 * 64, 64)
        assert layer.down.shape == (64, 64)
        assert layer.qkv_bias is not None and layer.qkv_bias.shape == (4 * head_dim,)
        prefix = "model.layers.1"
        q_rows = slice(rank * 2 * head_dim, (rank + 1) * 2 * head_dim)
        kv_rows = slice(rank * head_dim, (rank + 1) * head_dim)
        expected_qkv = torch.cat(
            [
                full[f"{prefix}.self_attn.q_proj.weight"][q_rows],
                full[f"{prefix}.self_attn.k_proj.weight"][kv_rows],
                full[f"{prefix}.self_attn.v_proj.weight"][kv_rows],
            ]
        )
        assert torch.equal(layer.qkv, expected_qkv)
        assert torch.equal(layer.o_proj, full[f"{prefix}.self_attn.o_proj.weight"][:, q_rows])
        assert torch.equal(
            layer.down, full[f"{prefix}.mlp.down_proj.weight"][:, rank * 64 : (rank + 1) * 64]
        )
        assert torch.equal(weights.embed, full["model.embed_tokens.weight"])
        # Only rank 0 computes logits, so only it keeps lm_head.
        assert (weights.lm_head is not None) == (rank == 0)


def test_tied_embeddings_share_the_embed_tensor(tmp_path: Path) -> None:
    model_dir = save_tiny_model(tmp_path, tie_word_embeddings=True)
    assert "lm_head.weight" not in _full(model_dir)
    config = ModelConfig.from_model_dir(model_dir)
    weights = load_llama_weights(model_dir, config)
    assert weights.lm_head is weights.embed


def test_sharded_checkpoint_with_index_loads_like_single_file(
    tiny_dir: Path, tmp_path: Path
) -> None:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    config = ModelConfig.from_model_dir(tmp_path)
    single = load_llama_weights(tiny_dir, config)
    sharded = load_llama_weights(tmp_path, config)
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        assert ckpt.names() == set(_full(tiny_dir))
    for a, b in zip(single.layers, sharded.layers, strict=True):
        assert torch.equal(a.qkv, b.qkv) and torch.equal(a.down, b.down)


def test_indivisible_kv_heads_raise_invalid_argument(tiny_dir: Path) -> None:
    config = ModelConfig.from_model_dir(tiny_dir)
    with pytest.raises(InvalidArgument) as info:
        load_llama_weights(tiny_dir, config, tp_rank=0, tp_size=4)  # 2 kv heads
    assert info.value.field == "tp_size"


def test_loads_in_requested_dtype(tiny_dir: Path) -> None:
    config = ModelConfig.from_model_dir(tiny_dir)
    weights = load_llama_weights(tiny_dir, config, dtype=torch.bfloat16)
    assert weights.layers[0].qkv.dtype == torch.bfloat16
    assert weights.embed.dtype == torch.bfloat16
