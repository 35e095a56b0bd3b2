"""Fine-tuning through the platform vs the same LoRA loop run directly, in one run.

(a) Platform: `deepserve up` (no serving deployment), the dataset uploaded with the Files API
    and a fine-tuning job created with the official `openai` client; the job runs preprocess ->
    LoRA training on a pod from the pool. Its step metrics (as the jobmgr recorded them in etcd)
    give the timings; the tokens of each step come from the job's own tokenized dataset and
    batch order (the non-padding tokens the pod trained on).
(b) Direct: the same model, training examples, batch order, batch size, learning rate and LoRA
    settings, trained with transformers + peft in a fresh Python process (like the pod's
    training, the first run in its process), no checkpoints, no RPCs.

Training tokens/s counts steps 2..N over the time from the end of step 1 to the end of step N
(both sides skip model load and the first, warm-up step). Also: the job's time from the create
request to its first training step (preprocess, pod acquisition, model load, the validation
pass before training, step 1).

The direct loop runs before and after the platform run; the ratio uses the faster of the two.
It also runs once more while the platform is still up and idle (the job ended, its pod back in
the pool): the same loop sharing the cores with the control plane the job had beside it. On a
2-core machine the control plane's wakeups (etcd, the services' event loops, idle pods) preempt
one of the two OpenMP threads every few milliseconds, and the other waits for it at the next
barrier; the gap between the two direct runs is that cost, which a cluster avoids by keeping
the control plane off the training node's cores.

    .venv/bin/python -m bench.finetune            # 64 examples, 1 epoch, batch 4
    .venv/bin/python -m bench.finetune --quick    # 28 examples
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import io
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.common import markdown_table, progress
from deepserve.files import LocalFileStore
from deepserve.flowserve.training.lora_trainer import (
    TrainingPlan,
    batches,
    collate,
    load_lora_model,
)
from deepserve.flowserve.training.training_service import _pad_id as pad_token_id
from deepserve.jobmgr.fine_tuning.preprocess import build_dataset
from deepserve.jobs.fine_tuning import BASE_LEARNING_RATE, FineTuningSpec
from deepserve.jobs.records import JobRecord
from deepserve.jobs.store import JobStore
from deepserve.models.catalog import default_cache_dir, resolve_model
from deepserve.store.etcd import EtcdStore
from deepserve.tokenizer import Tokenizer
from tests.cluster_harness import local_cluster

# The job holds out this share of the training file for validation (no validation file).
VALIDATION_SPLIT = FineTuningSpec.model_fields["validation_split"].default
SUBJECTS = ["rivers", "volcanoes", "owls", "copper", "tides", "glaciers", "comets", "bees"]


def dataset(n: int) -> bytes:
    """Chat examples of a few dozen tokens each (varied lengths, so batches carry padding)."""
    rows = []
    for i in range(n):
        subject = SUBJECTS[i % len(SUBJECTS)]
        answer = f"Fact {i} about {subject}: " + " ".join(
            f"{subject} item {j} is notable." for j in range(3 + i % 5)
        )
        messages = [
            {"role": "user", "content": f"Tell me fact number {i} about {subject}."},
            {"role": "assistant", "content": answer},
        ]
        rows.append(json.dumps({"messages": messages}))
    return ("\n".join(rows) + "\n").encode()


def step_tokens(plan: TrainingPlan) -> list[int]:
    """Non-padding tokens of each step, in the run's batch order."""
    return [sum(len(e["input_ids"]) for e in examples) for _, examples in batches(plan)]


async def job_record(etcd_endpoint: str, job_id: str) -> JobRecord:
    async with EtcdStore(etcd_endpoint) as etcd:
        return (await JobStore(etcd).get(job_id)).record


def platform_run(
    work: Path,
    model: str,
    data: bytes,
    batch_size: int,
    seed: int,
    pod_start: str,
    beside: Callable[[], dict[str, Any]],
) -> dict[str, Any]:
    import openai

    os.environ["DEEPSERVE_FILES_ROOT"] = str(work / "files")
    progress("[finetune] starting deepserve up")
    extra = ("--pod-start", pod_start)
    with local_cluster(work / "run", model="none", timeout_s=240, extra_args=extra) as cluster:
        client = openai.OpenAI(
            base_url=f"{cluster.layout.gateway_url}/v1", api_key="EMPTY", max_retries=0
        )
        file_id = client.files.create(
            file=("bench.jsonl", io.BytesIO(data)), purpose="fine-tune"
        ).id
        requested = time.time()
        job = client.fine_tuning.jobs.create(
            model=model,
            training_file=file_id,
            seed=seed,
            hyperparameters={"n_epochs": 1, "batch_size": batch_size},
        )
        progress(f"[finetune] job {job.id} created")
        deadline = time.monotonic() + 600
        while True:
            record = asyncio.run(job_record(cluster.layout.etcd_endpoint, job.id))
            assert record.fine_tuning is not None
            ft = record.fine_tuning.progress
            if record.status.phase.terminal:
                if record.status.phase.value != "succeeded":
                    raise RuntimeError(f"the job ended {record.status}")
                break
            if ft.total_steps and ft.step >= ft.total_steps:
                break  # every step is in; merging and registering are not what we measure
            if time.monotonic() > deadline:
                raise TimeoutError(f"the job is stuck at {ft.stage} step {ft.step}")
            # Not faster: each poll connects to etcd, and this process shares the cores.
            time.sleep(2.0)
        with contextlib.suppress(openai.APIError):
            client.fine_tuning.jobs.cancel(job.id)
        while not record.status.phase.terminal and time.monotonic() < deadline:
            time.sleep(1.0)  # the pod leaves training (merge cancelled) and goes back warm
            record = asyncio.run(job_record(cluster.layout.etcd_endpoint, job.id))
        time.sleep(2.0)  # a merge the cancel came too late for ends on the pod
        progress("[finetune] direct loop beside the idle platform")
        beside_run = beside()
        dataset_json = LocalFileStore(work / "files").get_artifact(ft.dataset_artifact)
    examples = json.loads(dataset_json)
    metrics = sorted(ft.metrics, key=lambda m: m.step)
    assert ft.first_step_at is not None
    return {
        "train": examples["train"],
        "step_at": [m.at for m in metrics],
        "losses": [m.train_loss for m in metrics],
        "seconds": [m.seconds for m in metrics],
        "trained_tokens": ft.trained_tokens,
        "time_to_first_step_s": ft.first_step_at - requested,
        "job_created_at": record.created_at,
        "started_at": ft.started_at,
        "beside": beside_run,
    }


def direct_run(plan: TrainingPlan, pad_id: int) -> dict[str, Any]:
    """The same LoRA loop with transformers + peft, in this process (the job's model loader)."""
    model = load_lora_model(plan)
    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=plan.learning_rate, weight_decay=0.0
    )
    step_at, losses, seconds = [], [], []
    for _, examples in batches(plan):
        started = time.perf_counter()
        batch = collate(examples, pad_id)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        step_at.append(time.perf_counter())
        seconds.append(step_at[-1] - started)
    return {"step_at": step_at, "losses": losses, "seconds": seconds}


def direct_run_fresh(plan: TrainingPlan, pad_id: int) -> dict[str, Any]:
    """direct_run in a new interpreter, as the pod's training is its process's first run (a
    process that already trained has its kernels for every batch shape ready)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(direct_run, plan, pad_id).result()


def tokens_per_s(step_at: list[float], tokens: list[int]) -> float:
    """Tokens of steps 2..N over the time from the end of step 1 to the end of step N."""
    return sum(tokens[1:]) / (step_at[-1] - step_at[0])


def compute_tokens_per_s(seconds: list[float], tokens: list[int]) -> float:
    """Tokens of steps 2..N over the time spent inside those steps (what the trainer measured,
    without the reporting and checkpoints between steps)."""
    return sum(tokens[1:]) / sum(seconds[1:])


def paired_step_ratio(platform: list[float], direct: list[float]) -> float:
    """Median over steps 2..N of direct / platform in-step time: both ran the same batches, so
    each pair compares like with like, and a burst of background load hits few pairs."""
    return statistics.median(d / p for p, d in zip(platform[1:], direct[1:], strict=True))


def local_dataset(model_dir: Path, data: bytes, seed: int) -> list[dict[str, list[int]]]:
    """The training examples the job's preprocess makes of `data` (same tokenizer and split)."""
    tokenizer = Tokenizer.from_model_dir(model_dir)
    built = build_dataset(tokenizer, ("bench", data), None, split=VALIDATION_SPLIT, seed=seed)
    return built.train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--quick", action="store_true", help="28 examples")
    parser.add_argument(
        "--pod-start", choices=("process", "zygote"), default="process", help="how pods start"
    )
    args = parser.parse_args()
    if args.quick:
        args.examples = 28
    work = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    data = dataset(args.examples)
    model_dir = resolve_model(args.model, default_cache_dir())
    plan = TrainingPlan(
        base_dir=model_dir,
        train=local_dataset(model_dir, data, args.seed),
        valid=[],
        output_dir=work / "direct-out",
        n_epochs=1,
        batch_size=args.batch_size,
        learning_rate=BASE_LEARNING_RATE,
        seed=args.seed,
    )
    tokens = step_tokens(plan)
    pad_id = pad_token_id(model_dir)
    # The direct loop runs before and after the platform run (the machine is shared: the
    # better of the two is the baseline).
    progress(f"[finetune] direct loop: {plan.total_steps} steps")
    directs = [direct_run_fresh(plan, pad_id)]
    platform = platform_run(
        work,
        args.model,
        data,
        args.batch_size,
        args.seed,
        args.pod_start,
        lambda: direct_run_fresh(plan, pad_id),
    )
    if platform["train"] != plan.train:
        raise RuntimeError("the job trained on other examples than the direct loop")
    if sum(tokens) != platform["trained_tokens"]:
        raise RuntimeError(f"token counts differ: {sum(tokens)} vs {platform['trained_tokens']}")
    progress("[finetune] direct loop again")
    directs.append(direct_run_fresh(plan, pad_id))

    platform_tps = tokens_per_s(platform["step_at"], tokens)
    direct_tps = [tokens_per_s(d["step_at"], tokens) for d in directs]
    # Against the faster direct run: background load only ever slows a run down.
    ratio = platform_tps / max(direct_tps)
    steps = len(tokens) - 1
    rows: list[list[object]] = [
        [
            "platform (job on a pod)",
            platform_tps,
            compute_tokens_per_s(platform["seconds"], tokens),
            (platform["step_at"][-1] - platform["step_at"][0]) / steps,
            f"{platform['losses'][0]:.3f} -> {platform['losses'][-1]:.3f}",
        ]
    ]
    beside_tps = tokens_per_s(platform["beside"]["step_at"], tokens)
    named_runs = [
        ("before", directs[0], direct_tps[0]),
        ("beside the idle platform", platform["beside"], beside_tps),
        ("after", directs[1], direct_tps[1]),
    ]
    for name, run, tps in named_runs:
        rows.append(
            [
                f"direct (transformers + peft), {name}",
                tps,
                compute_tokens_per_s(run["seconds"], tokens),
                (run["step_at"][-1] - run["step_at"][0]) / steps,
                f"{run['losses'][0]:.3f} -> {run['losses'][-1]:.3f}",
            ]
        )
    print(
        f"\n## Fine-tuning, {args.model}, LoRA r={plan.lora_rank}, {len(plan.train)} training "
        f"examples, batch {args.batch_size}, {plan.total_steps} steps, {sum(tokens)} tokens\n"
    )
    print(
        markdown_table(
            [
                "run",
                "training tok/s (steps 2..N)",
                "in-step tok/s",
                "s per step",
                "loss step 1 -> N",
            ],
            rows,
        )
    )
    verdict = "met" if ratio >= 0.9 else "not met"
    print(f"\nplatform / best direct tokens/s: {ratio:.3f} (goal within 10%: {verdict})")
    print(
        f"platform / direct beside the idle platform: {platform_tps / beside_tps:.3f}; "
        f"direct beside / best direct alone: {beside_tps / max(direct_tps):.3f}"
    )
    paired = [paired_step_ratio(platform["seconds"], run["seconds"]) for _, run, _ in named_runs]
    print(
        "paired per-step speed, platform / direct (median over steps 2..N): "
        + ", ".join(f"{name} {r:.3f}" for (name, _, _), r in zip(named_runs, paired, strict=True))
    )
    print(f"request -> first training step: {platform['time_to_first_step_s']:.1f} s")


if __name__ == "__main__":
    main()
