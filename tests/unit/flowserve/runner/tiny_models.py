"""Tiny random Hugging Face checkpoints and a greedy reference, shared by model and runner tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

TINY_SHAPE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 256,
    # Wider than the default 0.02 so logits spread out and greedy ties cannot hinge on rounding.
    "initializer_range": 0.2,
}

PROMPTS: list[list[int]] = [
    [5, 17, 99, 3, 250, 42, 7],
    [1, 2],
    [200, 100, 50, 25, 12, 6, 3, 1, 128, 64, 32, 16, 8],
    [77],
]


def save_tiny_model(path: Path, *, family: str = "llama", seed: int = 0, **overrides: Any) -> Path:
    """Write a random tiny model (float32 safetensors, HF layout) to `path` and return it."""
    torch.manual_seed(seed)
    fields = {**TINY_SHAPE, **overrides}
    if family == "qwen2":
        config = transformers.Qwen2Config(**fields)
        model = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.LlamaConfig(**fields)
        model = transformers.LlamaForCausalLM(config)
    model = model.to(torch.float32).eval()
    model.save_pretrained(path, safe_serialization=True)
    return path


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations from transformers' own generate(), one prompt at a time."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return greedy_tokens(model, prompts, max_new_tokens)


def greedy_tokens(model: Any, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """`model.generate()` greedy continuations of each prompt alone."""
    model.eval()
    # No early stop: the comparison wants exactly max_new_tokens argmax tokens, eos included
    # (min_new_tokens would instead mask eos out of the argmax).
    model.generation_config.eos_token_id = None
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=0,
            )
            outputs.append(out[0, len(prompt) :].tolist())
    return outputs
