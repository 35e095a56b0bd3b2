"""Turn one step's logits into one token per sequence, plus logprobs where asked.

Pipeline per step, vectorized over the step's rows: penalties -> min_tokens mask -> temperature ->
greedy rows take the argmax; the other rows get top-k, top-p, min-p masks and are sampled by
inverting their CDF at one uniform draw each. Seeded rows draw from their own generator, so a
seed yields the same tokens whatever else shares the step and wherever the row sits in it.

One uniform per row, not the exponential race (argmax of log p - log E, one Exp(1) draw per
vocabulary entry): torch draws those one at a time on one core, 56 ms for 32 rows of a 49k
vocabulary on this project's 2-core host against 2 ms for softmax weights, a cumsum and a search
(bench/RESULTS.md, issue #19), and the sampler runs beside the next step's forward.

Logprobs are the model's own distribution by default ("raw": log_softmax of the logits as the
model produced them, before penalties, temperature and truncation), as vLLM does; they describe
the model, not the sampling knobs, and stay comparable across requests. "processed" gives the
log_softmax after penalties, the min_tokens mask and temperature, before top-k/top-p/min-p.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from deepserve.flowserve.sampling.penalties import apply_penalties, block_tokens
from deepserve.flowserve.sampling.state import SamplingState

LogprobsMode = Literal["raw", "processed"]


@dataclass(slots=True)
class SampleResult:
    """The token picked for one sequence, and its logprobs when the request asked for them."""

    token_id: int
    logprob: float | None = None
    # (token_id, logprob), most likely first; None unless the request set top_logprobs > 0.
    top_logprobs: list[tuple[int, float]] | None = None


class Sampler:
    """Samples the next token for every sequence of a step from float32 logits [rows, vocab]."""

    def __init__(self, logprobs_mode: LogprobsMode = "raw") -> None:
        if logprobs_mode not in ("raw", "processed"):
            raise ValueError(f"unknown logprobs_mode {logprobs_mode!r}")
        self.logprobs_mode: LogprobsMode = logprobs_mode

    def sample(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> list[SampleResult]:
        """One token per row; the caller appends it to the request's output list itself."""
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} do not match {len(states)} requests"
            )
        if not states:
            return []
        device = logits.device
        # Own float32 copy: penalties and masks write in place, the caller's tensor stays intact.
        logits = logits.to(dtype=torch.float32, copy=True)
        wants_logprobs = any(s.params.logprobs for s in states)

        logprobs: torch.Tensor | None = None
        if wants_logprobs and self.logprobs_mode == "raw":
            logprobs = torch.log_softmax(logits, dim=-1)
        apply_penalties(logits, states)
        block_tokens(logits, states)
        temperatures = [s.params.temperature if s.params.temperature > 0 else 1.0 for s in states]
        if any(t != 1.0 for t in temperatures):
            logits.div_(torch.tensor(temperatures, dtype=torch.float32, device=device).unsqueeze(1))
        if wants_logprobs and self.logprobs_mode == "processed":
            logprobs = torch.log_softmax(logits, dim=-1)

        token_ids = self._pick(logits, states)
        return self._results(token_ids, logprobs, states)

    def _pick(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        random_rows = [i for i, s in enumerate(states) if not s.params.is_greedy]
        token_ids = logits.argmax(dim=-1)
        if not random_rows:
            return token_ids
        device = logits.device
        row_index = torch.tensor(random_rows, dtype=torch.int64, device=device)
        sub_states = [states[i] for i in random_rows]
        sub = logits.index_select(0, row_index)
        _truncate(sub, sub_states)
        token_ids.index_copy_(0, row_index, _inverse_cdf(sub, sub_states))
        return token_ids

    def _results(
        self,
        token_ids: torch.Tensor,
        logprobs: torch.Tensor | None,
        states: Sequence[SamplingState],
    ) -> list[SampleResult]:
        ids = token_ids.tolist()
        results = [SampleResult(token_id=token_id) for token_id in ids]
        if logprobs is None:
            return results
        rows = [i for i, s in enumerate(states) if s.params.logprobs]
        row_index = torch.tensor(rows, dtype=torch.int64, device=logprobs.device)
        sub = logprobs.index_select(0, row_index)
        chosen = sub.gather(1, token_ids.index_select(0, row_index).unsqueeze(1)).squeeze(1)
        top_n = max(states[i].params.top_logprobs for i in rows)
        top_values: list[list[float]] = []
        top_indices: list[list[int]] = []
        if top_n > 0:
            values, indices = sub.topk(min(top_n, sub.shape[1]), dim=-1)
            top_values, top_indices = values.tolist(), indices.tolist()
        for position, (row, logprob) in enumerate(zip(rows, chosen.tolist(), strict=True)):
            result = results[row]
            result.logprob = logprob
            wanted = states[row].params.top_logprobs
            if wanted > 0:
                result.top_logprobs = list(
                    zip(top_indices[position][:wanted], top_values[position][:wanted], strict=True)
                )
        return results


def _truncate(logits: torch.Tensor, states: Sequence[SamplingState]) -> None:
    """Mask (-inf) tokens outside top-k, then top-p of what is left, then below min-p (in place).

    HF's order. min-p compares each probability with the largest one, a ratio that renormalizing
    after top-k/top-p does not change, so its mask is computed on the same logits.
    """
    vocab_size = logits.shape[1]
    device = logits.device
    top_k = [s.params.top_k if 0 < s.params.top_k < vocab_size else vocab_size for s in states]
    top_p = [s.params.top_p for s in states]
    min_p = [s.params.min_p for s in states]
    need_top_k = any(k < vocab_size for k in top_k)
    need_top_p = any(p < 1.0 for p in top_p)

    min_p_floor: torch.Tensor | None = None
    if any(p > 0.0 for p in min_p):
        # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p); log(0) = -inf keeps all.
        log_min_p = torch.tensor(
            [math.log(p) if p > 0 else -math.inf for p in min_p], dtype=torch.float32, device=device
        )
        min_p_floor = logits.amax(dim=-1) + log_min_p

    if need_top_k or need_top_p:
        sorted_logits, sorted_index = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab_size, device=device).unsqueeze(0)
        drop = ranks >= torch.tensor(top_k, device=device).unsqueeze(1)
        if need_top_p:
            probs = sorted_logits.masked_fill(drop, -math.inf).softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs
            # Rows without top-p get an unreachable bound: rounding can push the mass to 1.0.
            bound = torch.tensor(
                [p if p < 1.0 else math.inf for p in top_p], dtype=torch.float32, device=device
            )
            drop |= mass_before >= bound.unsqueeze(1)
        sorted_logits.masked_fill_(drop, -math.inf)
        logits.scatter_(1, sorted_index, sorted_logits)

    if min_p_floor is not None:
        logits.masked_fill_(logits < min_p_floor.unsqueeze(1), -math.inf)


def _inverse_cdf(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """Sample each row from softmax(logits): the first token whose running weight passes u * total.

    Weights are exp(logit - row max), unnormalised (the draw is scaled by their total instead).
    A masked token (-inf) weighs 0, so its interval is empty and it is never picked.
    """
    device = logits.device
    cdf = (logits - logits.amax(dim=-1, keepdim=True)).exp_().cumsum_(dim=-1)
    uniform = torch.empty(len(states), 1, dtype=torch.float32, device=device)
    seeded = [(row, s.generator(device)) for row, s in enumerate(states)]
    if any(generator is None for _, generator in seeded):
        uniform.uniform_()
    for row, generator in seeded:
        if generator is not None:
            uniform[row].uniform_(generator=generator)
    total = cdf[:, -1:]
    # u * total can round up to total itself; the largest float below it keeps the pick on a
    # token of nonzero weight.
    target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)
