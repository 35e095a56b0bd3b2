"""RoPE frequencies and rotation against transformers' reference implementation."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from deepserve.flowserve.model.config import RopeScaling
from deepserve.flowserve.model.rotary import inverse_frequencies

ROPE_CASES = [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
]


@pytest.mark.parametrize("scaling", ROPE_CASES)
def test_inverse_frequencies_match_transformers(scaling: dict[str, float] | None) -> None:
    hf_config = transformers.LlamaConfig(
        hidden_size=128, num_attention_heads=2, rope_theta=50000.0, rope_scaling=scaling
    )
    ours_scaling = None
    if scaling is not None:
        ours_scaling = RopeScaling(
            str(scaling["rope_type"]),
            float(scaling["factor"]),
            float(scaling.get("low_freq_factor", 1.0)),
            float(scaling.get("high_freq_factor", 4.0)),
            int(scaling.get("original_max_position_embeddings", 8192)),
        )
        expected, _ = ROPE_INIT_FUNCTIONS[str(scaling["rope_type"])](hf_config, "cpu")
    else:
        expected = 1.0 / (50000.0 ** (torch.arange(0, 64, 2, dtype=torch.int64).float() / 64))
    ours = inverse_frequencies(64, 50000.0, ours_scaling)
    assert torch.equal(ours, expected)
    if scaling is not None:
        assert not torch.equal(ours, inverse_frequencies(64, 50000.0, None))


def test_rotate_equals_transformers_bit_for_bit() -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from deepserve.flowserve.model.config import ModelConfig
    from deepserve.flowserve.model.rotary import RotaryEmbedding

    torch.manual_seed(0)
    config = ModelConfig.from_dict(
        {
            "model_type": "llama",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 32,
            "max_position_embeddings": 128,
            "rope_theta": 10000.0,
        }
    )
    rotary = RotaryEmbedding(config, torch.device("cpu"), torch.float32)
    positions = torch.tensor([0, 5, 17, 100])
    x = torch.randn(4, 4, 16)
    cos, sin = rotary.cos_sin(positions)
    freqs = positions[:, None].float() * inverse_frequencies(16, 10000.0, None)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    # HF layout: [batch, heads, seq, dim] with cos/sin [batch, seq, dim].
    hf_q, _ = apply_rotary_pos_emb(
        x.transpose(0, 1)[None], x.transpose(0, 1)[None], emb.cos()[None], emb.sin()[None]
    )
    assert torch.equal(RotaryEmbedding.rotate(x, cos, sin), hf_q[0].transpose(0, 1))
