"""Logit penalties over the tokens a request has seen, applied to every row of a step at once."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from deepserve.flowserve.sampling.state import SamplingState


def output_token_counts(
    output_ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """[rows, vocab] float32 counts of each token in each row's output, via one scatter_add."""
    rows = len(output_ids)
    longest = max((len(ids) for ids in output_ids), default=0)
    counts = torch.zeros(rows, vocab_size + 1, dtype=torch.float32, device=device)
    if longest:
        # Pad with an extra column index that is dropped below.
        padded = torch.full((rows, longest), vocab_size, dtype=torch.int64)
        for row, ids in enumerate(output_ids):
            if ids:
                padded[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.int64)
        padded = padded.to(device, non_blocking=True)
        counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab_size]


def prompt_token_mask(
    states: Sequence[SamplingState], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """[rows, vocab] bool: which tokens occur in each row's prompt."""
    mask = torch.zeros(len(states), vocab_size + 1, dtype=torch.bool, device=device)
    prompts = [state.unique_prompt_ids() for state in states]
    if any(p.numel() for p in prompts):
        padded = pad_sequence(prompts, batch_first=True, padding_value=vocab_size)
        mask.scatter_(1, padded.to(device, non_blocking=True), True)
    return mask[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, states: Sequence[SamplingState]) -> None:
    """Apply repetition, frequency and presence penalties in place to rows that ask for them."""
    rows = [i for i, state in enumerate(states) if state.params.has_penalties]
    if not rows:
        return
    device = logits.device
    vocab_size = logits.shape[1]
    penalized = [states[i] for i in rows]
    row_index = torch.tensor(rows, dtype=torch.int64, device=device)
    sub = logits.index_select(0, row_index)
    counts = output_token_counts([s.output_token_ids for s in penalized], vocab_size, device)

    repetition = [s.params.repetition_penalty for s in penalized]
    if any(r != 1.0 for r in repetition):
        seen = prompt_token_mask(penalized, vocab_size, device) | (counts > 0)
        factor = torch.tensor(repetition, dtype=torch.float32, device=device).unsqueeze(1)
        # HF semantics: shrink positive logits, grow negative ones, so the token always loses.
        scaled = torch.where(sub > 0, sub / factor, sub * factor)
        sub = torch.where(seen, scaled, sub)

    frequency = [s.params.frequency_penalty for s in penalized]
    if any(f != 0.0 for f in frequency):
        sub -= torch.tensor(frequency, dtype=torch.float32, device=device).unsqueeze(1) * counts
    presence = [s.params.presence_penalty for s in penalized]
    if any(p != 0.0 for p in presence):
        present = (counts > 0).to(torch.float32)
        sub -= torch.tensor(presence, dtype=torch.float32, device=device).unsqueeze(1) * present
    logits.index_copy_(0, row_index, sub)


def block_tokens(logits: torch.Tensor, states: Sequence[SamplingState]) -> None:
    """Forbid EOS and stop tokens for rows still short of min_tokens (in place)."""
    vocab_size = logits.shape[1]
    row_ids: list[int] = []
    token_ids: list[int] = []
    for row, state in enumerate(states):
        blocked = [t for t in state.min_tokens_blocked_ids() if 0 <= t < vocab_size]
        row_ids.extend([row] * len(blocked))
        token_ids.extend(blocked)
    if not row_ids:
        return
    device = logits.device
    logits.index_put_(
        (
            torch.tensor(row_ids, dtype=torch.int64, device=device),
            torch.tensor(token_ids, dtype=torch.int64, device=device),
        ),
        torch.tensor(float("-inf"), device=device),
    )
