"""Rebuild a Hugging Face tokenizer (tokenizer.json + tokenizer_config.json) from GGUF metadata."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
)

from deepserve.errors import InvalidArgument, Unimplemented

# llama.cpp's token_type values (gguf.TokenType).
_TOKEN_NORMAL = 1
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# `tokenizer.ggml.pre` names the regex split that runs before byte-level BPE. llama.cpp groups
# these names by regex; both groups use the GPT-2 split, the first splits every digit apart
# before it (StarCoder's tokenizer, which SmolLM2 inherits: HF's Digits(individual) + ByteLevel).
_PRE_DIGITS_THEN_GPT2 = frozenset(
    {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
)
_PRE_GPT2 = frozenset({"gpt-2", "mpt", "olmo", "jais"})


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    # ByteLevel(use_regex=True) applies exactly GPT-2's split regex, as llama.cpp does for these.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in _PRE_DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _PRE_GPT2:
        return byte_level
    raise Unimplemented(
        f"GGUF pre-tokenizer {pre!r} is not supported yet; supported: "
        f"{sorted(_PRE_DIGITS_THEN_GPT2 | _PRE_GPT2)}",
        field="tokenizer.ggml.pre",
    )


def _token_at(tokens: list[str], metadata: Mapping[str, Any], key: str) -> str | None:
    token_id = metadata.get(key)
    if token_id is None:
        return None
    if not 0 <= int(token_id) < len(tokens):
        raise InvalidArgument(f"token id {token_id} outside the vocabulary", field=key)
    return tokens[int(token_id)]


def build_tokenizer(metadata: Mapping[str, Any]) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` equal to the one the GGUF was converted from."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise Unimplemented(
            f"GGUF tokenizer model {kind!r} is not supported yet (only byte-level BPE, 'gpt2')",
            field="tokenizer.ggml.model",
        )
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    merges: list[str] = list(metadata.get("tokenizer.ggml.merges", []))
    token_types: list[int] = list(
        metadata.get("tokenizer.ggml.token_type", [_TOKEN_NORMAL] * len(tokens))
    )
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise InvalidArgument("the GGUF vocabulary repeats tokens", field="tokenizer.ggml.tokens")

    # Byte-level tokens never hold a literal space (it is mapped to 'Ġ'), so one space separates
    # the two halves of a merge.
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False)
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = _pre_tokenizer(str(metadata.get("tokenizer.ggml.pre", "gpt-2")))
    tokenizer.decoder = decoders.ByteLevel()

    bos = _token_at(tokens, metadata, "tokenizer.ggml.bos_token_id")
    if metadata.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        bos_id = vocab[bos]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, bos_id)],
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)

    # Control tokens (chat markers, EOS) must match as one id and never be split by BPE; tokens
    # that already sit in the vocabulary keep their ids when added.
    tokenizer.add_special_tokens(
        [
            AddedToken(tokens[i], special=True, normalized=False)
            for i, kind_id in enumerate(token_types)
            if kind_id == _TOKEN_CONTROL
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(tokens[i], special=False, normalized=False)
            for i, kind_id in enumerate(token_types)
            if kind_id == _TOKEN_USER_DEFINED
        ]
    )
    if tokenizer.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise InvalidArgument("added tokens did not keep their GGUF ids", field="tokenizer.ggml")
    return tokenizer


def tokenizer_config(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The tokenizer_config.json content: special tokens, chat template, length limit."""
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    for name, key in (
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
    ):
        token = _token_at(tokens, metadata, key)
        if token is not None:
            config[name] = token
    context_length = metadata.get(f"{metadata.get('general.architecture')}.context_length")
    if context_length is not None:
        config["model_max_length"] = int(context_length)
    chat_template = metadata.get("tokenizer.chat_template")
    if chat_template:
        config["chat_template"] = str(chat_template)
    return config


def stop_token_ids(metadata: Mapping[str, Any]) -> list[int]:
    """Ids that end generation: EOS plus end-of-turn / end-of-message where the GGUF names them."""
    keys = (
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    )
    return sorted({int(metadata[key]) for key in keys if metadata.get(key) is not None})
