"""Requests that leave sampling fields out take the model's generation_config.json defaults."""

from __future__ import annotations

import json
from pathlib import Path

from deepserve.completions.prepare import build_sampling
from deepserve.completions.protocol import ChatCompletionRequest
from deepserve.tokenizer import Tokenizer
from tests.tiny_model import make_tiny_llama


def test_generation_config_defaults_fill_unset_fields_only(tmp_path: Path) -> None:
    model_dir = make_tiny_llama(tmp_path / "m")
    config = json.loads((model_dir / "generation_config.json").read_text())
    config.update({"temperature": 0.6, "top_p": 0.9, "top_k": 20, "do_sample": True})
    (model_dir / "generation_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer.from_model_dir(model_dir)
    assert tokenizer.generation_defaults == {"temperature": 0.6, "top_p": 0.9, "top_k": 20.0}

    def sampling(**fields: object):
        body = ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "x"}], **fields}
        )
        return build_sampling(
            body,
            max_tokens=None,
            logprobs=False,
            top_logprobs=0,
            vocab_size=tokenizer.vocab_size,
            defaults=tokenizer.generation_defaults,
        )

    unset = sampling()
    assert (unset.temperature, unset.top_p, unset.top_k, unset.min_p) == (0.6, 0.9, 20, 0.0)
    given = sampling(temperature=0, top_p=1.0, top_k=-1)
    assert (given.temperature, given.top_p, given.top_k) == (0.0, 1.0, -1)
