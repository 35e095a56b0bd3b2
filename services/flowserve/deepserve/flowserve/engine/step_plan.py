"""What the step planner hands the executor for one forward step (plain data, no torch).

The planner decides *which* tokens of *which* requests run this step and *where* their KV lives;
the model runner turns that into tensors. Keeping this contract free of torch lets the planner
be tested alone and lets the SPMD master ship it to executor processes cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class StepSequence:
    """One request's share of a step: a prompt chunk (prefill) or one new token (decode)."""

    request_id: str
    # Tokens whose KV is computed and written this step. For decode this is the single token
    # sampled last step; for prefill, the next chunk of the prompt.
    token_ids: list[int]
    # Position of token_ids[0] in the sequence == number of tokens whose KV is already cached.
    start_pos: int
    # Physical KV block ids covering positions [0, start_pos + len(token_ids)), in order.
    block_table: list[int]
    # True when the logits of the last token are needed (last prompt chunk, or decode).
    needs_logits: bool = True
    # The device slot of the request's LoRA adapter; -1 for the base model.
    adapter_slot: int = -1
    # >= 0 in a chained plan: token_ids[-1] is a placeholder for the token the feeding step
    # (StepPlan.fed_by_step) samples in this logits row; the executor writes it in.
    sampled_row: int = -1


@dataclass(slots=True)
class StepPlan:
    """Everything one forward step computes: each scheduled request's tokens and blocks."""

    step_id: int
    sequences: list[StepSequence] = field(default_factory=list)
    # A chained plan is submitted before the step it follows has been sampled: this names that
    # step, whose sampled tokens the executor writes over the placeholders (StepSequence.
    # sampled_row) just before running it. None: every token id is known.
    fed_by_step: int | None = None

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.sequences)

    @property
    def is_empty(self) -> bool:
        return not self.sequences
