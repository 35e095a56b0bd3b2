"""deepserve.tokenizer against transformers' AutoTokenizer on tokenizers built here.

A tiny byte-level BPE is trained in the test (ChatML special tokens added) and saved as a
model directory, so the comparison needs no download.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from deepserve.errors import FailedPrecondition, InvalidArgument, NotFound
from deepserve.tokenizer import Tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello world, this is a small corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "你好，世界。你好吗？我很好。",  # noqa: RUF001
    "Émojis 😀 and ümlauts, naïve café.",
    "def add(a, b):\n    return a + b\n",
] * 3

# ChatML in the shape SmolLM2 uses: a default system prompt when the chat has none.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Exercises what HF templates lean on: block trimming, tojson, namespace, loop controls,
# raise_exception, the generation tag and the special-token variables.
FEATURE_TEMPLATE = """{{ bos_token }}
{%- if tools %}
  <tools>
  {% for tool in tools %}
    {{ tool | tojson }}
  {% endfor %}
  </tools>
{% endif %}
{% set ns = namespace(turns=0) %}
{% for message in messages %}
  {% if message['role'] not in ['system', 'user', 'assistant'] %}
    {{ raise_exception('unknown role ' + message['role']) }}
  {% endif %}
  {% if message['role'] == 'system' and not loop.first %}
    {% continue %}
  {% endif %}
  {% set ns.turns = ns.turns + 1 %}
<|im_start|>{{ message['role'] }}
  {% if message['role'] == 'assistant' %}
{% generation %}{{ message['content'] }}{% endgeneration %}{{ eos_token }}
  {% else %}
{{ message['content'] }}<|im_end|>
  {% endif %}
{% endfor %}
turns={{ ns.turns }}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

TEXTS = [
    "Hello world",
    " leading space and  double  spaces",
    "你好，世界！😀🎉 mixed ünïcödé",  # noqa: RUF001
    "<|im_start|>user\nhi<|im_end|>\n",
    "code:\n\tdef f(x):\n        return x * 2\n",
    "",
]

MESSAGES: list[dict[str, Any]] = [
    {"role": "user", "content": "Hi there! 你好 😀"},
    {"role": "assistant", "content": "Hello, how can I help?"},
    {"role": "user", "content": 'Tell me about <tags> & "quotes".'},
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city <b>now</b> & später",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def _train_backend() -> BackendTokenizer:
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    return backend


def _write_model_dir(path: Path, config: dict[str, Any], backend: BackendTokenizer) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


def _chatml_config(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "chat_template": CHATML_TEMPLATE,
    }
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def backend() -> BackendTokenizer:
    return _train_backend()


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory: pytest.TempPathFactory, backend: BackendTokenizer) -> Path:
    return _write_model_dir(tmp_path_factory.mktemp("chatml"), _chatml_config(), backend)


@pytest.fixture(scope="module")
def hf_chatml(chatml_dir: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(chatml_dir))


def test_import_does_not_pull_in_torch() -> None:
    # The gateway imports this package and must not need torch.
    import subprocess

    code = "import sys, deepserve.tokenizer; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(
    chatml_dir: Path, hf_chatml: Any, text: str, add_special_tokens: bool
) -> None:
    ours = Tokenizer.from_model_dir(chatml_dir)
    expected = hf_chatml.encode(text, add_special_tokens=add_special_tokens)
    assert ours.encode(text, add_special_tokens=add_special_tokens) == expected


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_transformers(
    chatml_dir: Path, hf_chatml: Any, text: str, skip_special_tokens: bool
) -> None:
    ours = Tokenizer.from_model_dir(chatml_dir)
    ids = ours.encode(text)
    expected = hf_chatml.decode(ids, skip_special_tokens=skip_special_tokens)
    assert ours.decode(ids, skip_special_tokens=skip_special_tokens) == expected
    assert ours.convert_ids_to_tokens(ids) == hf_chatml.convert_ids_to_tokens(ids)


def test_special_token_attributes(chatml_dir: Path, hf_chatml: Any) -> None:
    ours = Tokenizer.from_model_dir(chatml_dir)
    assert ours.eos_token_id == hf_chatml.eos_token_id
    assert ours.bos_token_id == hf_chatml.bos_token_id
    assert ours.pad_token_id == hf_chatml.pad_token_id
    assert ours.eos_token_ids == (hf_chatml.eos_token_id,)
    assert ours.vocab_size == len(hf_chatml)
    # special_token_ids: every id that decode(skip_special_tokens=True) drops.
    assert set(hf_chatml.all_special_ids) <= ours.special_token_ids
    for token_id in ours.special_token_ids:
        assert ours.decode([token_id], skip_special_tokens=True) == ""
        assert ours.decode([token_id]) != ""


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chatml_template_matches_transformers(
    chatml_dir: Path, hf_chatml: Any, add_generation_prompt: bool
) -> None:
    ours = Tokenizer.from_model_dir(chatml_dir)
    for messages in (MESSAGES, [{"role": "system", "content": "Be terse."}, *MESSAGES]):
        expected = hf_chatml.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert ours.apply_chat_template(messages, add_generation_prompt) == expected
        expected_ids = hf_chatml.apply_chat_template(
            messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
        )
        assert ours.encode_chat(messages, add_generation_prompt) == expected_ids


def _with_bos_post_processor(backend: BackendTokenizer) -> BackendTokenizer:
    """A Llama-style tokenizer.json: its post-processor prepends BOS (<|endoftext|>)."""
    copy = BackendTokenizer.from_str(backend.to_str())
    bos_id = backend.token_to_id("<|endoftext|>")
    copy.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A",
        pair="<|endoftext|> $A $B",
        special_tokens=[("<|endoftext|>", bos_id)],
    )
    return copy


def test_encode_chat_does_not_add_bos_twice(tmp_path: Path, backend: BackendTokenizer) -> None:
    config = _chatml_config(chat_template=FEATURE_TEMPLATE, bos_token="<|endoftext|>")
    model_dir = _write_model_dir(tmp_path, config, _with_bos_post_processor(backend))
    ours = Tokenizer.from_model_dir(model_dir)
    bos = ours.bos_token_id
    assert ours.encode("hi")[0] == bos  # plain encode adds BOS through the post-processor
    assert ours.encode("hi", add_special_tokens=False)[0] != bos
    ids = ours.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == bos and ids[1] != bos  # the template wrote BOS; encode adds no second one
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text)
    expected = hf.apply_chat_template(
        [{"role": "user", "content": "hi"}],
        tokenize=True,
        return_dict=False,
        add_generation_prompt=True,
    )
    assert ids == expected


def test_feature_template_matches_transformers(tmp_path: Path, backend: BackendTokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    config = _chatml_config(chat_template=FEATURE_TEMPLATE)
    model_dir = _write_model_dir(tmp_path, config, backend)
    ours = Tokenizer.from_model_dir(model_dir)
    hf = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    messages = [{"role": "system", "content": "sys"}, *MESSAGES, {"role": "system", "content": "x"}]
    for tools in (None, TOOLS):
        expected = hf.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True
        )
        rendered = ours.apply_chat_template(messages, tools=tools)
        assert rendered == expected
    # tojson must not HTML-escape; the non-ASCII text stays as is.
    assert "<b>now</b> & später" in ours.apply_chat_template(messages, tools=TOOLS)


def test_template_raise_exception_is_invalid_argument(
    tmp_path: Path, backend: BackendTokenizer
) -> None:
    config = _chatml_config(chat_template=FEATURE_TEMPLATE)
    ours = Tokenizer.from_model_dir(_write_model_dir(tmp_path, config, backend))
    with pytest.raises(InvalidArgument) as info:
        ours.apply_chat_template([{"role": "robot", "content": "beep"}])
    assert info.value.field == "messages"
    assert "unknown role robot" in info.value.message


def test_template_sandbox_blocks_python_internals(
    tmp_path: Path, backend: BackendTokenizer
) -> None:
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    ours = Tokenizer.from_model_dir(
        _write_model_dir(tmp_path, _chatml_config(chat_template=evil), backend)
    )
    with pytest.raises(InvalidArgument):
        ours.apply_chat_template(MESSAGES)


def test_none_valued_keys_are_dropped(chatml_dir: Path, hf_chatml: Any) -> None:
    ours = Tokenizer.from_model_dir(chatml_dir)
    messages = [{"role": "user", "content": "hi", "tool_calls": None, "name": None}]
    expected = hf_chatml.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages) == expected


def test_empty_or_malformed_messages_are_rejected(chatml_dir: Path) -> None:
    ours = Tokenizer.from_model_dir(chatml_dir)
    for bad in ([], ["not a dict"], "hello"):
        with pytest.raises(InvalidArgument) as info:
            ours.apply_chat_template(bad)  # type: ignore[arg-type]
        assert info.value.field == "messages"


def test_named_templates_use_default_or_tool_use(tmp_path: Path, backend: BackendTokenizer) -> None:
    templates = [
        {"name": "default", "template": "DEFAULT{{ messages | length }}"},
        {"name": "tool_use", "template": "TOOLS{{ tools | length }}"},
    ]
    ours = Tokenizer.from_model_dir(
        _write_model_dir(tmp_path, _chatml_config(chat_template=templates), backend)
    )
    assert ours.apply_chat_template(MESSAGES) == "DEFAULT3"
    assert ours.apply_chat_template(MESSAGES, tools=TOOLS) == "TOOLS1"


def test_chat_template_jinja_file_overrides_config(
    tmp_path: Path, backend: BackendTokenizer
) -> None:
    model_dir = _write_model_dir(tmp_path, _chatml_config(), backend)
    (model_dir / "chat_template.jinja").write_text("FROM FILE {{ bos_token }}", encoding="utf-8")
    assert Tokenizer.from_model_dir(model_dir).apply_chat_template(MESSAGES) == (
        "FROM FILE <|im_start|>"
    )


def test_missing_template_and_missing_files(tmp_path: Path, backend: BackendTokenizer) -> None:
    config = _chatml_config()
    del config["chat_template"]
    ours = Tokenizer.from_model_dir(_write_model_dir(tmp_path / "m", config, backend))
    with pytest.raises(FailedPrecondition):
        ours.apply_chat_template(MESSAGES)
    with pytest.raises(NotFound):
        Tokenizer.from_model_dir(tmp_path / "nowhere")


def test_added_token_dicts_and_config_add_bos_match_transformers(
    tmp_path: Path, backend: BackendTokenizer
) -> None:
    # transformers v5 ignores add_bos_token when tokenizer.json exists; so must we.
    transformers = pytest.importorskip("transformers")
    config = _chatml_config(
        bos_token={
            "content": "<|endoftext|>",
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
            "special": True,
            "__type": "AddedToken",
        },
        add_bos_token=True,
        add_eos_token=False,
    )
    model_dir = _write_model_dir(tmp_path, config, backend)
    ours = Tokenizer.from_model_dir(model_dir)
    hf = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    assert ours.special_tokens["bos_token"] == "<|endoftext|>"
    assert ours.bos_token_id == hf.bos_token_id
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text)
    rendered = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(MESSAGES) == rendered


def test_generation_config_eos_ids_are_included(tmp_path: Path, backend: BackendTokenizer) -> None:
    model_dir = _write_model_dir(tmp_path, _chatml_config(), backend)
    endoftext = backend.token_to_id("<|endoftext|>")
    im_end = backend.token_to_id("<|im_end|>")
    (model_dir / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [endoftext, im_end]}), encoding="utf-8"
    )
    assert Tokenizer.from_model_dir(model_dir).eos_token_ids == (im_end, endoftext)


@pytest.mark.parametrize("key", ["additional_special_tokens", "extra_special_tokens"])
def test_declared_special_tokens_are_added_like_transformers(
    tmp_path: Path, backend: BackendTokenizer, key: str
) -> None:
    transformers = pytest.importorskip("transformers")
    config = _chatml_config(**{key: ["<|tool_call|>"]})
    model_dir = _write_model_dir(tmp_path, config, backend)
    ours = Tokenizer.from_model_dir(model_dir)
    hf = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    text = "call <|tool_call|> now"
    assert ours.encode(text) == hf.encode(text)
    tool_id = ours.token_to_id("<|tool_call|>")
    assert tool_id is not None and tool_id in ours.encode(text)
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == hf.decode(
        hf.encode(text), skip_special_tokens=True
    )
    assert ours.vocab_size == len(hf)
