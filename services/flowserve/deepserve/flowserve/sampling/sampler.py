"""Turn one step's logits into one token per sequence, plus logprobs where asked.

Pipeline per step, vectorized over the step's rows: penalties -> min_tokens mask -> temperature ->
greedy rows take the argmax; the other rows get top-k, top-p, min-p masks and are sampled by
inverting their CDF at one uniform draw each. Seeded rows draw from their own generator, so a
seed yields the same tokens whatever else shares the step and wherever the row sits in it.

One uniform per row, not the exponential race (argmax of log p - log E, one Exp(1) draw per
vocabulary entry): torch draws those one at a time on one core, 56 ms for 32 rows of a 49k
vocabulary on this project's 2-core host against 2 ms for softmax weights, a cumsum and a search
(bench/RESULTS.md, issue #19).

The next decode step waits for these tokens, so on CPU the pick runs in FlowServe's kernel
(`kernels/token_sampling`): argmax and the draw in one pass per row, temperature included, on
the executor's logits as they are. The copy, penalties, masks and truncation run only for the
rows of a step that ask for them; the kernel then draws from what they leave.

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

from deepserve.flowserve.kernels import token_sampling
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
        # Decided on the first CPU step (the kernel library loads on first use).
        self._kernel: bool | None = None

    def sample(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> list[SampleResult]:
        """One token per row; the caller appends it to the request's output list itself."""
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} do not match {len(states)} requests"
            )
        if not states:
            return []
        device = logits.device
        wants_logprobs = any(s.params.logprobs for s in states)
        vocab_size = logits.shape[1]
        if self._uses_kernel(logits) and not self._edits_logits(states, wants_logprobs, vocab_size):
            # Nothing writes the logits: the kernel reads the executor's tensor directly.
            raw = torch.log_softmax(logits, dim=-1) if wants_logprobs else None
            return self._results(self._kernel_pick(logits, states, scaled=False), raw, states)

        # Own float32 copy: penalties and masks write in place, the caller's tensor stays intact.
        logits = logits.to(dtype=torch.float32, copy=True)
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

    def _uses_kernel(self, logits: torch.Tensor) -> bool:
        if logits.device.type != "cpu" or logits.dtype != torch.float32:
            return False
        if self._kernel is None:
            self._kernel = token_sampling.available()
        return self._kernel

    def _edits_logits(
        self, states: Sequence[SamplingState], wants_logprobs: bool, vocab_size: int
    ) -> bool:
        """Whether this step needs the logits rewritten before the pick: penalties, blocked stop
        tokens, top-k/top-p/min-p, or logprobs of the processed distribution."""
        if wants_logprobs and self.logprobs_mode == "processed":
            return True
        return any(
            s.params.has_penalties
            or s.min_tokens_blocked_ids()
            or (not s.params.is_greedy and _truncates(s, vocab_size))
            for s in states
        )

    def _kernel_pick(
        self, logits: torch.Tensor, states: Sequence[SamplingState], scaled: bool
    ) -> torch.Tensor:
        """Argmax for greedy rows, one inverse-CDF draw for the others, in the kernel.
        `scaled`: temperature is already divided into the logits."""
        inverse = [
            0.0 if s.params.is_greedy else 1.0 if scaled else 1.0 / s.params.temperature
            for s in states
        ]
        uniform = torch.zeros(len(states), dtype=torch.float32)
        random_rows = [i for i, s in enumerate(states) if not s.params.is_greedy]
        if random_rows:
            uniform[random_rows] = _uniforms([states[i] for i in random_rows], uniform.device)
        return token_sampling.sample_tokens(
            logits.contiguous(), torch.tensor(inverse, dtype=torch.float32), uniform
        )

    def _pick(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        random_rows = [i for i, s in enumerate(states) if not s.params.is_greedy]
        if self._uses_kernel(logits):
            if random_rows:
                _truncate_rows(logits, random_rows, [states[i] for i in random_rows])
            return self._kernel_pick(logits, states, scaled=True)
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


def _truncates(state: SamplingState, vocab_size: int) -> bool:
    params = state.params
    return 0 < params.top_k < vocab_size or params.top_p < 1.0 or params.min_p > 0.0


def _truncate_rows(logits: torch.Tensor, rows: list[int], states: Sequence[SamplingState]) -> None:
    """`_truncate` on the given rows of `logits` (in place), if any of them truncates."""
    if not any(_truncates(s, logits.shape[1]) for s in states):
        return
    row_index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
    sub = logits.index_select(0, row_index)
    _truncate(sub, states)
    logits.index_copy_(0, row_index, sub)


def _uniforms(states: Sequence[SamplingState], device: torch.device) -> torch.Tensor:
    """One uniform in [0, 1) per row: seeded rows from their own generator, the rest from the
    global one."""
    uniform = torch.empty(len(states), dtype=torch.float32, device=device)
    seeded = [(row, s.generator(device)) for row, s in enumerate(states)]
    if any(generator is None for _, generator in seeded):
        uniform.uniform_()
    for row, generator in seeded:
        if generator is not None:
            uniform[row : row + 1].uniform_(generator=generator)
    return uniform


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
    uniform = _uniforms(states, device).unsqueeze(1)
    total = cdf[:, -1:]
    # u * total can round up to total itself; the largest float below it keeps the pick on a
    # token of nonzero weight.
    target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)
