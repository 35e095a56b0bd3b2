"""A deterministic stand-in for the model executor, for engine, step planner and server tests.

Its "KV cache" stores each position's token id in the block the step plan names, and every next
token is a hash of the context *read back from those blocks*. So a wrong block table, a
prefix-cache hit on blocks that were never written, or a host-tier round trip that loses data
changes the generated tokens (or raises), while a correct engine reproduces
`FakeExecutor.reference` exactly.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

from deepserve.flowserve.engine.step_plan import StepPlan
from deepserve.flowserve.runner.step_chain import StepChain, StepSampler, refuse_chained

T = TypeVar("T")

_UNWRITTEN = -1


def fake_next_token(context: Sequence[int], vocab_size: int) -> int:
    """The fake model: a hash of the whole context (order matters)."""
    acc = len(context)
    for token_id in context:
        acc = (acc * 1_000_003 + token_id + 1) % 2_147_483_647
    return acc % vocab_size


class FakeExecutor:
    """Executor-shaped fake: submit/execute/copy_to_host/load_from_host/shutdown, in order."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        vocab_size: int = 97,
        *,
        gate: threading.Event | None = None,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.vocab_size = vocab_size
        # While set-able and unset, steps wait on it (lets a test hold the engine mid-step).
        self.gate = gate
        self.kv = [[_UNWRITTEN] * block_size for _ in range(num_blocks)]
        # Every plan run, in order (tests read what the engine submitted).
        self.plans: list[StepPlan] = []
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fake-forward")

    @classmethod
    def reference(
        cls,
        prompt: Sequence[int],
        max_tokens: int,
        vocab_size: int = 97,
        eos_token_ids: Collection[int] = (),
    ) -> list[int]:
        """What a correct engine generates greedily for `prompt` (EOS included when hit)."""
        context = list(prompt)
        out: list[int] = []
        while len(out) < max_tokens:
            token_id = fake_next_token(context, vocab_size)
            out.append(token_id)
            context.append(token_id)
            if token_id in eos_token_ids:
                break
        return out

    def submit(self, plan: StepPlan) -> Future[torch.Tensor]:
        refuse_chained(plan)
        return self._worker.submit(self._run, plan)

    def execute(self, plan: StepPlan) -> torch.Tensor:
        return self.submit(plan).result()

    def copy_to_host(self, block_ids: Sequence[int]) -> torch.Tensor:
        # Same [layers, 2, blocks, ...] block axis as the real executor's host layout.
        return self._worker.submit(self._copy_out, list(block_ids)).result()

    def load_from_host(self, block_ids: Sequence[int], tensor: torch.Tensor) -> None:
        self._worker.submit(self._copy_in, list(block_ids), tensor).result()

    def shutdown(self) -> None:
        self._worker.shutdown(wait=True)

    def _run(self, plan: StepPlan) -> torch.Tensor:
        if self.gate is not None:
            self.gate.wait()
        self.plans.append(plan)
        next_ids: list[int] = []
        for seq in plan.sequences:
            for i, token_id in enumerate(seq.token_ids):
                if token_id < 0:
                    raise ValueError(f"{seq.request_id}: unresolved token id {token_id}")
                pos = seq.start_pos + i
                self.kv[seq.block_table[pos // self.block_size]][pos % self.block_size] = token_id
            if seq.needs_logits:
                end = seq.start_pos + len(seq.token_ids)
                context = [
                    self.kv[seq.block_table[p // self.block_size]][p % self.block_size]
                    for p in range(end)
                ]
                if _UNWRITTEN in context:
                    raise ValueError(f"{seq.request_id}: reads a KV slot never written")
                next_ids.append(fake_next_token(context, self.vocab_size))
        logits = torch.zeros(len(next_ids), self.vocab_size, dtype=torch.float32)
        for row, token_id in enumerate(next_ids):
            logits[row, token_id] = 10.0
        return logits

    def _copy_out(self, block_ids: list[int]) -> torch.Tensor:
        data = torch.tensor([self.kv[b] for b in block_ids], dtype=torch.int64)
        return data.reshape(1, 1, len(block_ids), self.block_size)

    def _copy_in(self, block_ids: list[int], tensor: torch.Tensor) -> None:
        rows = tensor.reshape(len(block_ids), self.block_size).tolist()
        for block_id, row in zip(block_ids, rows, strict=True):
            self.kv[block_id] = row


class SamplingFakeExecutor(FakeExecutor):
    """The fake with the real executor's sampled submissions and chained plans
    (deepserve.flowserve.runner.step_chain): the engine core chains decode steps over it."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._chain = StepChain()

    def submit_sampled(self, plan: StepPlan, sample: StepSampler[T]) -> Future[T]:
        return self._worker.submit(self._chain.run, self._run, plan, sample)
