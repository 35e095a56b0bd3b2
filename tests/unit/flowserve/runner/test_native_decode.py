"""Decode-only steps through every layer in one native call: the same logits, bit for bit, as the
Python layer loop over the same kernels, on the steps it serves, and the loop on the rest."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepserve.flowserve.engine.step_plan import StepPlan
from deepserve.flowserve.kernels import decode_layers, library
from deepserve.flowserve.model.native_decode import NativeDecode
from deepserve.flowserve.runner.model_runner import ModelRunner
from tests.unit.flowserve.runner.greedy_driver import GreedyDriver
from tests.unit.flowserve.runner.tiny_models import PROMPTS, hf_greedy, save_tiny_model

NUM_BLOCKS = 96
BLOCK_SIZE = 4
NEW_TOKENS = 12


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    # This machine kind has a compiler; a build failure is a failure, not a skip.
    library.build()
    assert decode_layers.available(torch.float32), "the op did not load or disagreed with its parts"


class Recorded:
    """A runner whose steps' logits, and which steps took the native call, are kept."""

    def __init__(self, model_dir: Path, *, native: bool) -> None:
        self.runner = ModelRunner(model_dir, "cpu", torch.float32, NUM_BLOCKS, BLOCK_SIZE)
        model = self.runner.model
        if not native:
            model.native_decode = None
        self.logits: list[torch.Tensor] = []
        self.native_steps: list[bool] = []
        self._calls = 0
        if model.native_decode is not None:
            run = model.native_decode.run

            def counted(*args: object) -> torch.Tensor:
                self._calls += 1
                return run(*args)  # type: ignore[arg-type]

            model.native_decode.run = counted  # type: ignore[method-assign]

    def execute(self, plan: StepPlan) -> torch.Tensor:
        before = self._calls
        logits = self.runner.execute(plan)
        self.native_steps.append(self._calls > before)
        self.logits.append(logits.clone())
        return logits

    def generate(self, prompts: list[list[int]], chunk_size: int | None) -> list[list[int]]:
        driver = GreedyDriver(self.execute, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)
        return driver.generate(prompts, NEW_TOKENS, chunk_size)


@pytest.mark.parametrize(
    ("family", "overrides"),
    [("llama", {}), ("qwen2", {}), ("llama", {"head_dim": 32})],
    ids=["llama", "qwen2-bias", "head-dim-32"],
)
def test_native_decode_steps_equal_the_layer_loop_bit_for_bit(
    tmp_path: Path, family: str, overrides: dict[str, object]
) -> None:
    model_dir = save_tiny_model(tmp_path, family=family, seed=2, **overrides)
    prompts = PROMPTS[:3]
    native = Recorded(model_dir, native=True)
    loop = Recorded(model_dir, native=False)
    tokens = native.generate(prompts, chunk_size=3)
    assert loop.generate(prompts, chunk_size=3) == tokens
    assert tokens == hf_greedy(model_dir, prompts, NEW_TOKENS)
    assert len(native.logits) == len(loop.logits)
    for step, (got, want) in enumerate(zip(native.logits, loop.logits, strict=True)):
        assert torch.equal(got, want), f"step {step} differs"
    # Every step after the prompts' chunks is decode-only, and those take the native call.
    assert sum(native.native_steps) >= NEW_TOKENS - 1
    assert not any(loop.native_steps)


def test_steps_with_prompt_chunks_take_the_layer_loop(tmp_path: Path) -> None:
    model_dir = save_tiny_model(tmp_path, seed=3)
    native = Recorded(model_dir, native=True)
    # 13 prompt tokens in chunks of 5, 5 and 3: those steps must not take the native call (a
    # one-token chunk would: it is attended as a decode).
    native.generate([PROMPTS[2]], chunk_size=5)
    prompt_steps = 3
    assert native.native_steps[:prompt_steps] == [False] * prompt_steps
    assert all(native.native_steps[prompt_steps:])


def test_the_native_path_waits_for_every_weight_to_be_packed(tmp_path: Path) -> None:
    model_dir = save_tiny_model(tmp_path, seed=4)
    runner = ModelRunner(model_dir, "cpu", torch.float32, NUM_BLOCKS, BLOCK_SIZE)
    native = runner.model.native_decode
    assert isinstance(native, NativeDecode)
    # Before any step has packed a weight, no decode step can take the native call.
    assert runner.model.linear.pending > 0  # type: ignore[union-attr]
    assert native._gather() is None
