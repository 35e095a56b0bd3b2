"""The LoRA loop on a tiny Llama: loss falls, a resumed run matches, stop ends it, merge loads."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from deepserve.adapters.peft_format import BaseShape, inspect_adapter
from deepserve.flowserve.training.lora_trainer import (
    CheckpointSaved,
    Evaluated,
    StepDone,
    TrainingEvent,
    TrainingFinished,
    TrainingPlan,
    TrainingStopped,
    batches,
    run_lora_training,
)
from tests.tiny_model import make_tiny_llama

pytestmark = pytest.mark.timeout(60)


def dataset() -> list[dict[str, list[int]]]:
    examples = []
    for i in range(6):
        prompt = [1, 10 + i, 20 + i]
        answer = [30 + i, 40, 41, 2]
        examples.append({"input_ids": prompt + answer, "labels": [-100] * 3 + answer})
    return examples


def plan_for(tmp_path: Path, **changes: object) -> TrainingPlan:
    base = tmp_path / "base"
    if not base.exists():
        make_tiny_llama(base)
    values: dict[str, object] = {
        "base_dir": base,
        "train": dataset(),
        "valid": dataset()[:2],
        "output_dir": tmp_path / "merged",
        "n_epochs": 4,
        "batch_size": 2,
        "learning_rate": 1e-2,
        "lora_rank": 4,
        "seed": 3,
        "checkpoint_every_steps": 4,
    }
    values.update(changes)
    return TrainingPlan(**values)  # type: ignore[arg-type]


def run(plan: TrainingPlan, stop: threading.Event | None = None) -> list[TrainingEvent]:
    torch.set_num_threads(1)
    events: list[TrainingEvent] = []
    saved: dict[str, bytes] = {}

    def save(step: int, data: bytes) -> str:
        saved[f"ckpt-{step}"] = data
        return f"ckpt-{step}"

    def emit(event: TrainingEvent) -> None:
        events.append(event)
        run.saved = saved  # type: ignore[attr-defined]

    run_lora_training(plan, emit, stop or threading.Event(), save)
    return events


def test_batches_follow_a_fixed_order(tmp_path: Path) -> None:
    plan = plan_for(tmp_path)
    first = [[e["input_ids"] for e in b] for _, b in batches(plan)]
    assert first == [[e["input_ids"] for e in b] for _, b in batches(plan)]
    assert len(first) == plan.total_steps == 12


def test_loss_falls_and_resume_continues_the_same_run(tmp_path: Path) -> None:
    plan = plan_for(tmp_path)
    events = run(plan)
    steps = [e for e in events if isinstance(e, StepDone)]
    evals = {e.when: e.valid_loss for e in events if isinstance(e, Evaluated)}
    assert [s.step for s in steps] == list(range(1, 13))
    assert steps[-1].train_loss < steps[0].train_loss
    assert evals["after"] < evals["before"]
    assert (plan.output_dir / "model.safetensors").is_file()
    checkpoints = [e for e in events if isinstance(e, CheckpointSaved)]
    assert [c.step for c in checkpoints] == [3, 4, 6, 8, 9, 12]
    saved = run.saved  # type: ignore[attr-defined]
    resumed = run(plan_for(tmp_path, resume=saved["ckpt-8"], output_dir=tmp_path / "m2"))
    resumed_steps = [e for e in resumed if isinstance(e, StepDone)]
    assert [s.step for s in resumed_steps] == [9, 10, 11, 12]
    for ours, theirs in zip(resumed_steps, steps[8:], strict=True):
        assert ours.train_loss == pytest.approx(theirs.train_loss, rel=1e-4)
    assert resumed_steps[-1].trained_tokens == steps[-1].trained_tokens


def test_stop_ends_the_run_before_the_next_step(tmp_path: Path) -> None:
    stop = threading.Event()
    seen: list[int] = []

    def emit(event: TrainingEvent) -> None:
        if isinstance(event, StepDone):
            seen.append(event.step)
            if event.step == 2:
                stop.set()

    with pytest.raises(TrainingStopped):
        run_lora_training(plan_for(tmp_path), emit, stop, lambda s, d: f"c{s}")
    assert seen == [1, 2]


def test_an_adapter_only_run_writes_a_servable_peft_adapter_and_no_merged_model(
    tmp_path: Path,
) -> None:
    plan = plan_for(tmp_path, n_epochs=1, adapter_only=True, output_dir=tmp_path / "ft:m:x:1")
    events = run(plan)
    done = events[-1]
    assert isinstance(done, TrainingFinished)
    assert done.model_dir is None and not plan.output_dir.exists()
    assert done.adapter_dir == plan.adapter_dir
    spec = inspect_adapter(done.adapter_dir, BaseShape.from_config_json(plan.base_dir), 16)
    assert spec.rank == 4 and set(spec.targets) == {"q_proj", "k_proj", "v_proj", "o_proj"}
