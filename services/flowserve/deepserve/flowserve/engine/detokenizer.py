"""Streaming token ids -> text deltas, with stop strings cut out before they reach the client.

Two hold-backs make the stream safe:
- UTF-8: a byte-level token may carry part of a character; its decode then ends in U+FFFD. Text
  is only released once the window decodes cleanly, and a character still incomplete when
  generation ends (cut at max_tokens) is dropped, never sent as U+FFFD. Decoding uses a small window of tokens
  (prefix offset .. end) and emits what the window adds beyond its prefix (prefix .. read
  offset), so each step costs a few tokens, not the whole sequence, and tokenizers that drop a
  leading space on the first decoded token still get the space right.
- Stop strings: text that could be the start of a stop string waits until the next tokens show
  whether the stop string follows. On a match the text before it is released and the rest is
  dropped (OpenAI leaves the stop string out of the output).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as left context so the first output token decodes as it would in place.
PROMPT_CONTEXT_TOKENS = 5
# Tokens before the window are dropped once this many pile up (amortizes the list shift).
_TRIM_AFTER = 64


class TokenDecoder(Protocol):
    """Anything with a HF-style decode (deepserve.tokenizer.Tokenizer, transformers tokenizers)."""

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns one request's output tokens, pushed one at a time, into clean text deltas."""

    def __init__(
        self,
        tokenizer: TokenDecoder,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = [s for s in stop if s]
        # Longest text that could still grow into a stop string: one char short of the longest.
        self._max_partial = max((len(s) for s in self._stop), default=1) - 1
        # Only a window of tokens is ever decoded; older ones are dropped as it slides.
        self._tokens: list[int] = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)
        self._pending = ""  # decoded text not yet released (possible start of a stop string)
        self.stopped = False
        self.stop_match: str | None = None

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text now safe to send (often "")."""
        if self.stopped:
            return ""
        self._tokens.append(token_id)
        self._pending += self._decode_new()
        return self._release(final=False)

    def flush(self) -> str:
        """End of generation: release everything held back, except a trailing character whose
        bytes never all arrived (generation was cut mid-character, e.g. at max_tokens): its
        U+FFFD would be a character the model never wrote."""
        if self.stopped:
            return ""
        tail = self._decode_window(self._prefix_offset, len(self._tokens))
        head = self._decode_window(self._prefix_offset, self._read_offset)
        if len(tail) > len(head):
            # Held back only because it ended in U+FFFD: the incomplete bytes at the very end.
            self._pending += tail[len(head) :].rstrip(REPLACEMENT_CHAR)
        self._read_offset = self._prefix_offset = len(self._tokens)
        return self._release(final=True)

    def _decode_window(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self._tokenizer.decode(
            self._tokens[start:end], skip_special_tokens=self._skip_special_tokens
        )

    def _decode_new(self) -> str:
        prefix_text = self._decode_window(self._prefix_offset, self._read_offset)
        full_text = self._decode_window(self._prefix_offset, len(self._tokens))
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR):
            # Nothing new yet, or a character still missing bytes: wait for more tokens.
            return ""
        # The window slides: what was new becomes the prefix that gives the next token context.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        if self._prefix_offset > _TRIM_AFTER:
            del self._tokens[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return full_text[len(prefix_text) :]

    def _release(self, final: bool) -> str:
        pending = self._pending
        match_at, match = self._first_stop(pending)
        if match is not None:
            self.stopped = True
            self.stop_match = match
            self._pending = ""
            return pending[:match_at]
        keep = 0 if final else self._stop_prefix_len(pending)
        self._pending = pending[len(pending) - keep :] if keep else ""
        return pending[: len(pending) - keep]

    def _first_stop(self, text: str) -> tuple[int, str | None]:
        """The stop string whose first occurrence ends first, and where it starts.

        Ending first is what a character-by-character stream would see first, so the result does
        not depend on how the text was split into tokens. On a tie the longer one wins.
        """
        best_end, best_at, best = len(text) + 1, len(text), None
        for stop in self._stop:
            at = text.find(stop)
            if at == -1:
                continue
            end = at + len(stop)
            if end < best_end or (end == best_end and at < best_at):
                best_end, best_at, best = end, at, stop
        return best_at, best

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        for length in range(min(self._max_partial, len(text)), 0, -1):
            suffix = text[-length:]
            if any(stop.startswith(suffix) for stop in self._stop):
                return length
        return 0
