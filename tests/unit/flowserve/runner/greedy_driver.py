"""A trivial block allocator and greedy loop that drive an executor the way the engine would."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from deepserve.flowserve.engine.step_plan import StepPlan, StepSequence


@dataclass
class _Sequence:
    request_id: str
    prompt: list[int]
    computed: int = 0  # tokens whose KV is cached
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)


class GreedyDriver:
    """Schedules prompts (whole or in chunks), decodes one token per step, takes the argmax."""

    def __init__(
        self,
        execute: Callable[[StepPlan], torch.Tensor],
        *,
        num_blocks: int,
        block_size: int,
        first_block: int = 0,
    ) -> None:
        self.execute = execute
        self.block_size = block_size
        # Hand out blocks from the high end in a shuffled-looking order, so block tables are
        # never simply 0, 1, 2... and a wrong slot computation shows.
        self.free = list(range(first_block, num_blocks))[::-1]
        self.step_id = 0

    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, chunk_size: int | None = None
    ) -> list[list[int]]:
        seqs = [_Sequence(f"req-{i}", list(p)) for i, p in enumerate(prompts)]
        while any(len(s.output) < max_new_tokens for s in seqs):
            active = [s for s in seqs if len(s.output) < max_new_tokens]
            scheduled = [self._schedule(s, chunk_size) for s in active]
            plan = StepPlan(step_id=self.step_id, sequences=scheduled)
            self.step_id += 1
            logits = self.execute(plan)
            assert logits.dtype == torch.float32
            assert logits.shape[0] == sum(s.needs_logits for s in scheduled)
            rows = iter(logits.argmax(dim=-1).tolist())
            for seq, sched in zip(active, scheduled, strict=True):
                seq.computed += len(sched.token_ids)
                if sched.needs_logits:
                    seq.output.append(next(rows))
        return [s.output for s in seqs]

    def _schedule(self, seq: _Sequence, chunk_size: int | None) -> StepSequence:
        if seq.computed < len(seq.prompt):
            end = len(seq.prompt)
            if chunk_size is not None:
                end = min(end, seq.computed + chunk_size)
            tokens = seq.prompt[seq.computed : end]
            needs_logits = end == len(seq.prompt)
        else:
            tokens = [seq.output[-1]]
            needs_logits = True
        total = seq.computed + len(tokens)
        while len(seq.blocks) * self.block_size < total:
            seq.blocks.append(self.free.pop())
        return StepSequence(
            request_id=seq.request_id,
            token_ids=tokens,
            start_pos=seq.computed,
            block_table=list(seq.blocks),
            needs_logits=needs_logits,
        )
