"""The LoRA training loop: a base model in float32, adapters from peft, AdamW, checkpoints.

Runs in a worker thread. Batches follow a seeded order per epoch, so a run resumed from a
checkpoint at step k trains on exactly the batches the interrupted run would have after k.
The stop flag is checked before every optimizer step: a cancel takes effect within one step.
"""

from __future__ import annotations

import io
import math
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deepserve.flowserve.runner.cpu_threads import use_intraop_threads

IGNORE_INDEX = -100
# Model-directory files the merged model keeps from its base (tokenizer and generation defaults).
CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


@dataclass(frozen=True)
class TrainingPlan:
    """Everything one run needs, as plain values."""

    base_dir: Path
    train: list[dict[str, list[int]]]
    valid: list[dict[str, list[int]]]
    output_dir: Path
    n_epochs: int
    batch_size: int
    learning_rate: float
    lora_rank: int = 8
    lora_alpha: int = 16
    seed: int = 0
    checkpoint_every_steps: int = 0
    resume: bytes | None = None
    # Write only the adapter (PEFT files), not the merged full model too.
    adapter_only: bool = False

    @property
    def adapter_dir(self) -> Path:
        return self.output_dir.parent / "adapters" / self.output_dir.name

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train) / self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.n_epochs * self.steps_per_epoch


@dataclass(frozen=True)
class StepDone:
    step: int
    total_steps: int
    train_loss: float
    tokens: int
    trained_tokens: int
    seconds: float
    learning_rate: float


@dataclass(frozen=True)
class CheckpointSaved:
    step: int
    artifact: str
    train_loss: float


@dataclass(frozen=True)
class Evaluated:
    when: str  # "before" or "after"
    valid_loss: float
    examples: int


@dataclass(frozen=True)
class TrainingFinished:
    model_dir: Path | None  # the merged model, when written
    trained_tokens: int
    steps: int
    adapter_dir: Path | None = None


TrainingEvent = StepDone | CheckpointSaved | Evaluated | TrainingFinished


class TrainingStopped(Exception):
    """The run was cancelled (its stop flag was set)."""


def collate(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads a batch: padding is masked out of attention and labels."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(plan: TrainingPlan) -> Iterator[tuple[int, list[dict[str, list[int]]]]]:
    """(global step, examples) in the run's fixed order."""
    step = 0
    for epoch in range(plan.n_epochs):
        order = list(range(len(plan.train)))
        random.Random(plan.seed * 1_000_003 + epoch).shuffle(order)
        for start in range(0, len(order), plan.batch_size):
            step += 1
            yield step, [plan.train[i] for i in order[start : start + plan.batch_size]]


def load_lora_model(plan: TrainingPlan) -> Any:
    """The base model in float32 with LoRA adapters on the attention projections."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(plan.seed)
    base = LlamaForCausalLM.from_pretrained(plan.base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=plan.lora_rank,
        lora_alpha=plan.lora_alpha,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, config)


@torch.no_grad()
def validation_loss(model: Any, examples: list[dict[str, list[int]]], pad_id: int) -> float:
    """Mean per-token loss over the examples' answer tokens."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), 8):
        batch = collate(examples[start : start + 8], pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
        shift_labels = batch["labels"][:, 1:].reshape(-1)
        loss = torch.nn.functional.cross_entropy(
            shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total += float(loss)
        count += int((shift_labels != IGNORE_INDEX).sum())
    model.train()
    return total / max(count, 1)


def run_lora_training(
    plan: TrainingPlan,
    emit: Callable[[TrainingEvent], None],
    stop: threading.Event,
    save_checkpoint: Callable[[int, bytes], str],
    pad_id: int = 0,
) -> TrainingFinished:
    """Trains, checkpoints, evaluates, writes the adapter and (unless adapter_only) the merged
    model."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    use_intraop_threads()  # not the single thread a serving engine loop left process-wide
    model = load_lora_model(plan)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=plan.learning_rate, weight_decay=0.0)
    start_step, trained_tokens = 0, 0
    if plan.resume is not None:
        state = torch.load(io.BytesIO(plan.resume), weights_only=False)
        set_peft_model_state_dict(model, state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, trained_tokens = state["step"], state["trained_tokens"]
    elif plan.valid:
        emit(Evaluated("before", validation_loss(model, plan.valid, pad_id), len(plan.valid)))
    model.train()
    step, loss_value = start_step, float("nan")
    for step, examples in batches(plan):
        if step <= start_step:
            continue  # done before the checkpoint this run resumed from
        if stop.is_set():
            raise TrainingStopped(f"stopped before step {step}")
        started = time.perf_counter()
        batch = collate(examples, pad_id)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
        tokens = int(batch["attention_mask"].sum())
        trained_tokens += tokens
        emit(
            StepDone(
                step,
                plan.total_steps,
                loss_value,
                tokens,
                trained_tokens,
                time.perf_counter() - started,
                plan.learning_rate,
            )
        )
        every = plan.checkpoint_every_steps
        epoch_end = step % plan.steps_per_epoch == 0
        if (every and step % every == 0) or (epoch_end and step < plan.total_steps):
            buffer = io.BytesIO()
            torch.save(
                {
                    "lora": get_peft_model_state_dict(model),
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                    "trained_tokens": trained_tokens,
                },
                buffer,
            )
            emit(CheckpointSaved(step, save_checkpoint(step, buffer.getvalue()), loss_value))
    if stop.is_set():
        raise TrainingStopped("stopped before evaluation")
    if plan.valid:
        emit(Evaluated("after", validation_loss(model, plan.valid, pad_id), len(plan.valid)))
    write_adapter(model, plan)
    if not plan.adapter_only:
        write_merged_model(model, plan)
    finished = TrainingFinished(
        None if plan.adapter_only else plan.output_dir, trained_tokens, step, plan.adapter_dir
    )
    emit(finished)
    return finished


def write_adapter(model: Any, plan: TrainingPlan) -> None:
    """The trained LoRA adapter in PEFT's format, written whole or not at all."""
    target = plan.adapter_dir
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


def write_merged_model(model: Any, plan: TrainingPlan) -> None:
    """Folds the adapters into the base weights and writes a complete model directory."""
    merged = model.merge_and_unload()
    partial = plan.output_dir.with_name(plan.output_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    merged.save_pretrained(partial, safe_serialization=True)
    for name in CARRIED_FILES:
        source = plan.base_dir / name
        if source.is_file():
            shutil.copy2(source, partial / name)
    shutil.rmtree(plan.output_dir, ignore_errors=True)
    partial.rename(plan.output_dir)
