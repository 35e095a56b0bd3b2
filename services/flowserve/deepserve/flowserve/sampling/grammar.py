"""Structured outputs in the sampler: compiled grammars, each request's matcher, token bitmasks.

A request with a `StructuredOutput` gets an llguidance matcher compiled for the engine's
tokenizer (compiled grammars are cached per grammar text; a request takes a copy). Before a
step's logits are sampled, each constrained row's matcher catches up with the request's output
tokens and writes a bitmask of the tokens the grammar allows next; the sampler sets every other
logit to -inf. Catching up from the output tokens (instead of feeding the matcher as tokens are
sampled) makes the matcher follow whatever the engine did: a preempted request recomputes its
KV but keeps its tokens and its matcher; a request resumed from tokens, or a decode instance
handed its first token by a prefill instance, replays them into a fresh matcher.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from deepserve.errors import InvalidArgument
from deepserve.structured_output import StructuredOutput

log = logging.getLogger(__name__)

# 32 vocabulary entries per int32 word of a bitmask.
_BITS = 32


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + _BITS - 1) // _BITS


class GrammarCompiler:
    """Compiles structured-output grammars for one tokenizer; compiled grammars are cached.

    `tokenizer_json` gives the tokenizer.json text (read lazily: building llguidance's token
    trie costs a fraction of a second, paid by the first constrained request). Thread-safe:
    compiles run in worker threads, off the engine loop.
    """

    def __init__(
        self,
        tokenizer_json: Callable[[], str],
        vocab_size: int,
        eos_token_ids: Sequence[int],
        *,
        cache_size: int = 256,
    ) -> None:
        self._tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size
        self._eos = list(dict.fromkeys(eos_token_ids))
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._ll_tokenizer: Any | None = None
        # grammar text -> a compiled matcher nobody consumes with (requests get deep copies).
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self.compiles = 0

    def _tokenizer(self) -> Any:
        import llguidance

        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.LLTokenizer(
                    self._tokenizer_json(),
                    n_vocab=self.vocab_size,
                    eos_token=self._eos or None,
                )
            return self._ll_tokenizer

    def matcher(self, constraint: StructuredOutput) -> Any:
        """A fresh matcher for the constraint (InvalidArgument naming the field when the
        grammar does not compile). Call from a worker thread: a first compile may take ms."""
        import llguidance

        grammar = constraint.grammar()
        with self._lock:
            template = self._compiled.get(grammar)
            if template is not None:
                self._compiled.move_to_end(grammar)
        if template is None:
            template = llguidance.LLMatcher(self._tokenizer(), grammar, log_level=0)
            if template.is_error():
                raise InvalidArgument(
                    f"cannot be enforced: {template.get_error().strip().splitlines()[0]}",
                    field=constraint.field,
                )
            with self._lock:
                self.compiles += 1
                self._compiled[grammar] = template
                while len(self._compiled) > self._cache_size:
                    self._compiled.popitem(last=False)
        return template.deep_copy()

    def state(self, constraint: StructuredOutput) -> GrammarState:
        return GrammarState(self.matcher(constraint))

    def cached_state(self, constraint: StructuredOutput) -> GrammarState | None:
        """A matcher copied from the cache, or None when the grammar was never compiled here
        (cheap: callers on an event loop try this before paying a thread hop)."""
        grammar = constraint.grammar()
        with self._lock:
            template = self._compiled.get(grammar)
            if template is None:
                return None
            self._compiled.move_to_end(grammar)
        return GrammarState(template.deep_copy())


@dataclass(eq=False)
class GrammarState:
    """One request's matcher and how many of its output tokens the matcher has consumed."""

    matcher: Any
    consumed: int = 0
    failed: bool = field(default=False)

    def catch_up(self, output_token_ids: Sequence[int]) -> None:
        """Feed the matcher the output tokens it has not seen (usually one, or none)."""
        if self.failed or self.consumed >= len(output_token_ids):
            return
        new = list(output_token_ids[self.consumed :])
        self.consumed = len(output_token_ids)
        if self.matcher.is_stopped():
            return  # the grammar is complete; what follows (EOS) needs no checking
        if not self.matcher.consume_tokens(new):
            # Only an unmasked token can do this (e.g. a token sampled before the request got
            # its matcher); leave the rest of the output unconstrained rather than stall.
            self.failed = True
            log.warning("structured output: matcher rejected tokens: %s", self.matcher.get_error())

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed-next-token mask into bitmask[row] (int32, CPU, contiguous)."""
        if self.failed:
            bitmask[row].fill_(-1)
            return
        target = bitmask[row]
        self.matcher.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * 4)


@dataclass(frozen=True, slots=True)
class TokenBitmask:
    """Allowed-next-token masks of a step's constrained rows: `bits[i]` belongs to logits row
    `rows[i]` (int32 words, 32 vocabulary entries each; bit set = allowed)."""

    rows: list[int]
    bits: torch.Tensor


def compute_bitmask(requests: Sequence[Any], vocab_size: int) -> TokenBitmask | None:
    """Masks for the rows whose request has a grammar (`.grammar`, `.output_token_ids`), each
    matcher first catching up with its request's output; None when no row is constrained."""
    constrained = [(i, r) for i, r in enumerate(requests) if r.grammar is not None]
    if not constrained:
        return None
    bits = torch.empty((len(constrained), bitmask_words(vocab_size)), dtype=torch.int32)
    for slot, (_, request) in enumerate(constrained):
        state: GrammarState = request.grammar
        state.catch_up(request.output_token_ids)
        state.fill(bits, slot)
    return TokenBitmask([i for i, _ in constrained], bits)


def apply_token_bitmask(logits: torch.Tensor, mask: TokenBitmask) -> None:
    """Set the logits of tokens a row's grammar forbids to -inf, in place ([rows, vocab])."""
    if logits.device.type == "cpu" and logits.dtype in _NUMPY_DTYPES:
        _apply_on_host(logits, mask)
        return
    vocab_size = logits.shape[1]
    shifts = torch.arange(_BITS, dtype=torch.int32)
    allowed = ((mask.bits.unsqueeze(-1) >> shifts) & 1).bool().reshape(len(mask.rows), -1)
    allowed = allowed[:, :vocab_size]
    if allowed.shape[1] < vocab_size:
        # Ids past the tokenizer's vocabulary (a padded embedding) are never allowed.
        pad = torch.zeros(len(mask.rows), vocab_size - allowed.shape[1], dtype=torch.bool)
        allowed = torch.cat([allowed, pad], dim=1)
    index = torch.tensor(mask.rows, dtype=torch.int64, device=logits.device)
    # Executors return inference tensors: only inference mode may write them in place.
    with torch.inference_mode():
        sub = logits.index_select(0, index)
        sub.masked_fill_(~allowed.to(logits.device, non_blocking=True), float("-inf"))
        logits.index_copy_(0, index, sub)


# Host logits are masked with numpy: single-threaded, no OpenMP barrier. On a busy CPU host the
# same few element-wise torch ops waited on each other's threads for 40-140 ms a step (numpy:
# 2-7 ms for 8 rows of a 49k vocabulary, measured side by side).
_NUMPY_DTYPES = (torch.float32, torch.float16, torch.float64)


def _apply_on_host(logits: torch.Tensor, mask: TokenBitmask) -> None:
    vocab_size = logits.shape[1]
    words = mask.bits.numpy().view(np.uint8)  # little-endian int32 words: bit i = token i
    allowed = np.unpackbits(words, axis=1, bitorder="little")[:, :vocab_size]
    values = logits.numpy()
    for slot, row in enumerate(mask.rows):
        values[row, : allowed.shape[1]][allowed[slot] == 0] = -np.inf
        # Ids past the tokenizer's vocabulary (a padded embedding) are never allowed.
        values[row, allowed.shape[1] :] = -np.inf
