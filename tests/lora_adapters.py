"""PEFT LoRA adapters with random weights, and peft's merged-model greedy reference."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from tests.unit.flowserve.runner.tiny_models import greedy_tokens

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    rank: int = 8,
    alpha: int = 16,
    seed: int = 0,
    targets: list[str] | None = None,
    scale: float = 1.0,
) -> Path:
    """Save a PEFT adapter of `base_dir` with random A and B (peft's default B is zeros)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=targets or ALL_TARGETS,
        init_lora_weights=False,
        lora_dropout=0.0,
    )
    model = get_peft_model(base, config)
    if scale != 1.0:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.mul_(scale)
    model.save_pretrained(out_dir)
    return out_dir


def peft_merged_greedy(
    base_dir: Path, adapter_dir: Path | None, prompts: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """Greedy tokens of peft's merged model (base + adapter folded in), one prompt at a time."""
    from peft import PeftModel

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return greedy_tokens(model, prompts, max_new_tokens)


def write_synthetic_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    rank: int = 16,
    alpha: int = 32,
    seed: int = 0,
    targets: list[str] | None = None,
    std: float = 0.02,
) -> Path:
    """A PEFT adapter for `base_dir` written directly (no model load): random A and B."""
    import json

    from safetensors.torch import save_file

    from deepserve.adapters.peft_format import BaseShape

    base = BaseShape.from_config_json(base_dir)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    chosen = targets or ALL_TARGETS
    for layer in range(base.num_layers):
        for target in chosen:
            module = "self_attn" if target in ALL_TARGETS[:4] else "mlp"
            in_f, out_f = base.in_out(target)
            prefix = f"base_model.model.model.layers.{layer}.{module}.{target}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_f, generator=generator) * std
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, rank, generator=generator) * std
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": chosen,
        "bias": "none",
        "base_model_name_or_path": str(base_dir),
        "task_type": "CAUSAL_LM",
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config))
    return out_dir
