import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, LlamaForCausalLM

from deepserve.errors import Unimplemented
from deepserve.models import gguf_convert
from deepserve.models.gguf_convert import convert_gguf
from tests.unit.models.tiny_gguf import SPECIAL_TOKENS, TinyLlama, tiny_vocab, write_tiny_gguf

torch.set_num_threads(1)

INPUT_IDS = torch.tensor([[1, 40, 100, 7, 250, 263, 3, 99, 2, 150, 17, 200]])


def _logits(model: LlamaForCausalLM) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT_IDS).logits


def _convert(tmp_path: Path, **kwargs: object) -> tuple[TinyLlama, Path]:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", **kwargs)  # type: ignore[arg-type]
    out = tmp_path / "hf"
    convert_gguf(tiny.gguf_path, out)
    return tiny, out


@pytest.mark.parametrize("tied", [True, False])
def test_converted_model_matches_the_original_logits(tmp_path: Path, tied: bool) -> None:
    tiny, out = _convert(tmp_path, tied=tied)
    converted = LlamaForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(converted), _logits(tiny.model), rtol=1e-5, atol=1e-5)


def test_quantized_tensors_are_dequantized(tmp_path: Path) -> None:
    tiny, out = _convert(tmp_path, embed_q8_0=True)
    converted = LlamaForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(converted), _logits(tiny.model), rtol=1e-5, atol=1e-5)


def test_skipping_the_unpermute_would_change_logits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Guards the logits comparison above: it must be able to see a missing q/k unpermute.
    monkeypatch.setattr(gguf_convert, "undo_llama_cpp_permute", lambda w, n_head: w)
    tiny, out = _convert(tmp_path)
    converted = LlamaForCausalLM.from_pretrained(out).eval()
    assert not torch.allclose(_logits(converted), _logits(tiny.model), atol=1e-3)


def test_config_comes_from_llama_metadata(tmp_path: Path) -> None:
    _, out = _convert(tmp_path, tied=True)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    expected = {
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 128,
        "vocab_size": len(tiny_vocab()),
        "rms_norm_eps": 1e-6,
        "rope_theta": 50000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    assert {k: config[k] for k in expected} == expected
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2


@pytest.mark.parametrize("tied", [True, False])
def test_tensor_names_follow_hugging_face_llama(tmp_path: Path, tied: bool) -> None:
    tiny, out = _convert(tmp_path, tied=tied)
    with safe_open(out / "model.safetensors", framework="np") as f:
        names = set(f.keys())
        q0 = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert names == set(tiny.model.state_dict()) - ({"lm_head.weight"} if tied else set())
    assert ("lm_head.weight" in names) is not tied
    assert q0.dtype == np.float32 and q0.shape == (64, 64)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied


def test_bfloat16_output_loads_and_stays_close(tmp_path: Path) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "hf-bf16"
    convert_gguf(tiny.gguf_path, out, dtype="bfloat16")
    with safe_open(out / "model.safetensors", framework="pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
    reference = tiny.model.model.embed_tokens.weight.detach().to(torch.bfloat16)
    assert embed.dtype == torch.bfloat16
    assert torch.equal(embed, reference)  # same rounding as torch's float32 -> bfloat16
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_progress_reports_every_tensor(tmp_path: Path) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    lines: list[str] = []
    convert_gguf(tiny.gguf_path, tmp_path / "hf", progress=lines.append)
    total = 2 + 9 * 2  # embedding and final norm (tied: no output), 9 per layer
    assert lines == [f"[convert] {done}/{total} tensors" for done in range(1, total + 1)]


def test_tokenizer_is_byte_level_bpe_with_single_id_specials(tmp_path: Path) -> None:
    _, out = _convert(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(out)
    vocab = tiny_vocab()
    hello, world = vocab.index("hello"), vocab.index("Ġworld")
    assert tokenizer.encode("hello world") == [hello, world]
    assert tokenizer.encode("<|im_start|>hello<|im_end|>") == [1, hello, 2]
    text = "héllo wörld 日本 🚀 12"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    # The "smollm" pre-tokenizer splits digits one by one (llama.cpp's \p{N} rule).
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("2024")) == ["2", "0", "2", "4"]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.pad_token == "<|im_end|>"
    for token_id, token in enumerate(SPECIAL_TOKENS):  # every control token is one id...
        assert tokenizer.encode(token) == [token_id]
    # ...and counts as special when decoding.
    assert tokenizer.decode([0, hello, 2], skip_special_tokens=True) == "hello"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(("pre", "tokens"), [("smollm", ["1", "2"]), ("gpt-2", ["12"])])
def test_pre_tokenizer_variant_decides_digit_splitting(
    tmp_path: Path, pre: str, tokens: list[str]
) -> None:
    _, out = _convert(tmp_path, pre=pre)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("12")) == tokens


def test_unsupported_pre_tokenizer_is_refused(tmp_path: Path) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", pre="qwen2")
    with pytest.raises(Unimplemented, match="qwen2"):
        convert_gguf(tiny.gguf_path, tmp_path / "hf")
