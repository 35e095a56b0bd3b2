"""IncrementalDetokenizer: clean UTF-8 deltas and stop strings on tokenizers trained here."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from deepserve.flowserve.engine.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from deepserve.tokenizer import Tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello world, hello there. The weather is nice today.",
    "你好世界，你好吗？今天天气很好。",  # noqa: RUF001
    "Emoji: 😀😀 🎉 ❤️ and café naïve",
    "stop ### here and END of text",
] * 4

TEXTS = [
    "Hello 😀 world 🎉🎉!",
    "你好，世界！今天天气很好。",  # noqa: RUF001
    "mixed: café ❤️ 你好 😀 naïve 👩‍👩‍👧 done",
    "🤖🦾🧠",  # emoji the tokenizer never saw: raw byte tokens only
    "plain ascii text with nothing special",
]


def _byte_level() -> Tokenizer:
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    return Tokenizer(backend, special_tokens={"eos_token": "<|im_end|>"})


def _metaspace() -> Tokenizer:
    """SentencePiece-style: the decoder drops the leading space of the first token it sees."""
    backend = BackendTokenizer(models.BPE(byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL_TOKENS + byte_tokens, show_progress=False
    )
    backend.train_from_iterator(CORPUS, trainer)
    return Tokenizer(backend, special_tokens={"eos_token": "<|im_end|>"})


@pytest.fixture(scope="module")
def byte_level() -> Tokenizer:
    return _byte_level()


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    deltas = [detok.push(token_id) for token_id in ids]
    deltas.append(detok.flush())
    return deltas


def test_tokenizer_really_splits_characters(byte_level: Tokenizer) -> None:
    # Guards the tests below: they only mean something if single tokens carry partial characters.
    ids = byte_level.encode("🤖 你好", add_special_tokens=False)
    assert any(REPLACEMENT_CHAR in byte_level.decode([t]) for t in ids)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_never_hold_broken_characters(byte_level: Tokenizer, text: str) -> None:
    ids = byte_level.encode(text, add_special_tokens=False)
    prompt = byte_level.encode("User: say something\nAssistant:", add_special_tokens=False)
    deltas = _stream(IncrementalDetokenizer(byte_level, prompt), ids)
    assert all(REPLACEMENT_CHAR not in delta for delta in deltas)
    assert "".join(deltas) == byte_level.decode(ids) == text


def test_long_output_survives_window_trimming(byte_level: Tokenizer) -> None:
    text = " ".join(TEXTS) * 6
    ids = byte_level.encode(text, add_special_tokens=False)
    assert len(ids) > 200
    deltas = _stream(IncrementalDetokenizer(byte_level), ids)
    assert "".join(deltas) == text
    assert all(REPLACEMENT_CHAR not in delta for delta in deltas)


def test_leading_space_kept_with_metaspace_decoder() -> None:
    tokenizer = _metaspace()
    prompt_text, output_text = "Hello world", " hello there 😀 today"
    prompt = tokenizer.encode(prompt_text, add_special_tokens=False)
    output = tokenizer.encode(output_text, add_special_tokens=False)
    # In context the output's first token keeps its space; decoding it alone would drop it.
    in_context = tokenizer.decode(prompt + output)[len(tokenizer.decode(prompt)) :]
    deltas = _stream(IncrementalDetokenizer(tokenizer, prompt), output)
    assert "".join(deltas) == in_context
    assert in_context.startswith(" ")
    assert all(REPLACEMENT_CHAR not in delta for delta in deltas)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_skipped_or_kept(byte_level: Tokenizer, skip: bool) -> None:
    end = byte_level.token_to_id("<|im_end|>")
    assert end is not None
    ids = [*byte_level.encode("Hi 😀", add_special_tokens=False), end]
    text = "".join(_stream(IncrementalDetokenizer(byte_level, skip_special_tokens=skip), ids))
    assert text == ("Hi 😀" if skip else "Hi 😀<|im_end|>")


def test_a_character_cut_by_max_tokens_is_dropped_not_replaced(byte_level: Tokenizer) -> None:
    ids = byte_level.encode("ok 🤖", add_special_tokens=False)
    cut = ids[:-1]  # stop mid-character, as max_tokens can
    detok = IncrementalDetokenizer(byte_level)
    pushed = "".join(detok.push(t) for t in cut)
    assert REPLACEMENT_CHAR not in pushed
    assert REPLACEMENT_CHAR in byte_level.decode(cut)
    assert pushed + detok.flush() == "ok "


def _stop_cases() -> list[tuple[str, str]]:
    cases = []
    for text in TEXTS:
        for length in (1, 2, 3, 5):
            for start in range(0, len(text) - length + 1, 3):
                cases.append((text, text[start : start + length]))
    return cases


def test_stop_strings_are_cut_and_never_leak(byte_level: Tokenizer) -> None:
    cases = _stop_cases()
    assert len(cases) > 50
    for text, stop in cases:
        ids = byte_level.encode(text, add_special_tokens=False)
        detok = IncrementalDetokenizer(byte_level, stop=[stop])
        emitted = ""
        for token_id in ids:
            emitted += detok.push(token_id)
            # At every step: no part of the first stop occurrence has gone out.
            assert text.startswith(emitted), (text, stop, emitted)
            assert len(emitted) <= text.index(stop), (text, stop, emitted)
            if detok.stopped:
                break
        emitted += detok.flush()
        assert detok.stopped and detok.stop_match == stop
        assert emitted == text[: text.index(stop)], (text, stop)
        assert detok.push(ids[0]) == "" and detok.flush() == ""


def test_possible_stop_prefix_is_held_then_released(byte_level: Tokenizer) -> None:
    detok = IncrementalDetokenizer(byte_level, stop=["###"])
    first = byte_level.encode("value #", add_special_tokens=False)
    held = "".join(detok.push(t) for t in first)
    assert held == "value "  # "#" could start "###"
    rest = byte_level.encode("# 2", add_special_tokens=False)
    released = "".join(detok.push(t) for t in rest) + detok.flush()
    assert held + released == "value ## 2"
    assert not detok.stopped


def test_held_prefix_is_flushed_at_the_end(byte_level: Tokenizer) -> None:
    detok = IncrementalDetokenizer(byte_level, stop=["END!"])
    ids = byte_level.encode("the END", add_special_tokens=False)
    streamed = "".join(detok.push(t) for t in ids)
    assert streamed == "the "
    assert detok.flush() == "END"
    assert not detok.stopped


def test_stop_that_completes_first_wins(byte_level: Tokenizer) -> None:
    ids = byte_level.encode("abcdef", add_special_tokens=False)
    detok = IncrementalDetokenizer(byte_level, stop=["bcdef", "cd"])
    text = "".join(_stream(detok, ids))
    assert detok.stop_match == "cd"
    assert text == "ab"


def test_stop_string_with_multibyte_characters(byte_level: Tokenizer) -> None:
    text = "今天天气很好 😀 bye"
    ids = byte_level.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(byte_level, stop=["很好 😀"])
    out = "".join(_stream(detok, ids))
    assert out == "今天天气"
    assert detok.stopped
