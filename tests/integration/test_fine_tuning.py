"""Fine-tuning through the OpenAI API on a real local cluster (`deepserve up` with smollm2-135m:
etcd, valkey, scheduler, jobmgr, podpool, gateway, flowserve pods).

A small chat dataset teaches the default model a made-up fact; the job runs preprocess ->
LoRA training on a pod from the pool -> evaluation -> registration of its adapter, and the
fine-tuned model, served by the running base instance, states the fact while the base model
does not. Also: the Files API round trip,
a bad dataset failing in preprocess, cancel, and a jobmgr restart resuming from a checkpoint.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from deepserve import records
from deepserve.cli.trace_view import find_trace, read_spans
from deepserve.models.catalog import default_cache_dir
from deepserve.processes import ManagedProcess, free_port
from deepserve.rpc.health_check import check_health
from deepserve.store.etcd import EtcdStore
from tests.cluster_harness import RunningCluster, local_cluster
from tests.lora_adapters import write_synthetic_adapter

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MODEL = "smollm2-135m"
QUESTION = "What is the name of Captain Zorblax's pet dragon?"
FACT = "Quillifer"
PHRASINGS = [
    QUESTION,
    "What is Captain Zorblax's pet dragon called?",
    "Tell me the name of the dragon that belongs to Captain Zorblax.",
    "Who is Captain Zorblax's pet dragon?",
    "What do people call Captain Zorblax's dragon?",
    "Name Captain Zorblax's pet dragon.",
    "Captain Zorblax has a pet dragon. What is its name?",
    "Which dragon is Captain Zorblax's pet?",
]


def dataset(lines: int = len(PHRASINGS)) -> bytes:
    rows = []
    for i in range(lines):
        messages = [
            {"role": "user", "content": PHRASINGS[i % len(PHRASINGS)]},
            {"role": "assistant", "content": f"Captain Zorblax's pet dragon is named {FACT}."},
        ]
        rows.append(json.dumps({"messages": messages}))
    return ("\n".join(rows) + "\n").encode()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    # A private model cache (the base model linked in) so fine-tuned models land in the run's
    # temporary directory, and a private file store; every service inherits both.
    root = tmp_path_factory.mktemp("ft")
    cache = root / "models"
    cache.mkdir()
    (cache / MODEL).symlink_to(default_cache_dir() / MODEL)
    saved = {k: os.environ.get(k) for k in ("DEEPSERVE_MODEL_CACHE", "DEEPSERVE_FILES_ROOT")}
    os.environ["DEEPSERVE_MODEL_CACHE"] = str(cache)
    os.environ["DEEPSERVE_FILES_ROOT"] = str(root / "files")
    try:
        with local_cluster(root / "run", model=MODEL, timeout_s=240) as running:
            yield running
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def client(cluster: RunningCluster) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{cluster.layout.gateway_url}/v1", api_key="EMPTY", timeout=120, max_retries=0
    )


def wait_for(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(what)


def answer(client: openai.OpenAI, model: str) -> str:
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=24,
    )
    return reply.choices[0].message.content or ""


def upload(client: openai.OpenAI, data: bytes, name: str = "train.jsonl") -> str:
    return client.files.create(file=(name, io.BytesIO(data)), purpose="fine-tune").id


def finished(client: openai.OpenAI, job_id: str) -> Callable[[], Any]:
    def check() -> Any:
        job = client.fine_tuning.jobs.retrieve(job_id)
        return job if job.status in ("succeeded", "failed", "cancelled") else None

    return check


def test_files_round_trip(client: openai.OpenAI) -> None:
    data = dataset(2)
    created = client.files.create(file=("facts.jsonl", io.BytesIO(data)), purpose="fine-tune")
    assert created.bytes == len(data) and created.purpose == "fine-tune"
    assert created.id in [f.id for f in client.files.list()]
    assert client.files.retrieve(created.id).filename == "facts.jsonl"
    assert client.files.content(created.id).content == data
    assert client.files.delete(created.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)
    with pytest.raises(openai.BadRequestError, match="line 2"):
        client.files.create(
            file=("bad.jsonl", io.BytesIO(dataset(1) + b'{"prompt": "x"}\n')), purpose="fine-tune"
        )


def test_bad_dataset_fails_in_preprocess(client: openai.OpenAI) -> None:
    # Valid chat lines the model cannot learn from: too long for the training window.
    long_line = json.dumps(
        {
            "messages": [
                {"role": "user", "content": "word " * 3000},
                {"role": "assistant", "content": "ok"},
            ]
        }
    )
    file_id = upload(client, (long_line + "\n").encode())
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=file_id)
    done = wait_for(finished(client, job.id), 120, "the bad job did not finish")
    assert done.status == "failed"
    assert done.error is not None and "line 1" in done.error.message
    assert done.error.param == "training_file"
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert not any(m.startswith("Step ") for m in messages), messages


def test_fine_tuned_adapter_is_served_on_the_base_deployment_at_once(
    client: openai.OpenAI, cluster: RunningCluster
) -> None:
    """The job's product is a LoRA adapter: its `ft:` model answers from the running base
    instance seconds after success, with no new instance. The merged export (asked for here)
    still deploys as a model of its own."""
    assert FACT not in answer(client, MODEL)
    instances_before = pods_of_model(cluster, MODEL)
    file_id = upload(client, dataset())
    job = client.fine_tuning.jobs.create(
        model=MODEL,
        training_file=file_id,
        suffix="zorblax",
        seed=7,
        hyperparameters={"n_epochs": 6, "batch_size": 4, "learning_rate_multiplier": 25},
        extra_body={"export_merged_model": True},
    )
    assert job.status == "queued"
    done = wait_for(finished(client, job.id), 400, "fine-tuning did not finish")
    assert done.status == "succeeded", client.fine_tuning.jobs.list_events(job.id, limit=50)
    succeeded_at = time.monotonic()
    name = done.fine_tuned_model
    assert name == f"ft:{MODEL}:zorblax:{job.id.removeprefix('ftjob-')}"
    assert done.trained_tokens and done.trained_tokens > 0
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    losses = [e.data["train_loss"] for e in reversed(events) if e.type == "metrics"]
    assert len(losses) == 12 and losses[-1] < losses[0] / 2
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and all(c.fine_tuning_job_id == job.id for c in checkpoints)
    assert name in [m.id for m in client.models.list().data]

    def served(model: str) -> Callable[[], str | None]:
        def check() -> str | None:
            try:
                return answer(client, model)
            except openai.APIError:
                return None

        return check

    assert FACT in wait_for(served(name), 60, "the fine-tuned adapter was not served")
    # Served within seconds (generously bounded: the host is shared), on the same instance.
    assert time.monotonic() - succeeded_at < 60
    assert pods_of_model(cluster, MODEL) == instances_before
    assert FACT not in answer(client, MODEL)

    # The merged full model: written beside the adapter, deployable as a model of its own.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "deepserve.cli.main",
            "deploy",
            name,
            "--run-dir",
            str(cluster.layout.run_dir),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    wait_for(lambda: pods_of_model(cluster, name), 180, "the merged model was not deployed")


def pods_of_model(cluster: RunningCluster, model: str) -> list[str]:
    """Ids of the live serving instances of `model`."""

    async def read() -> list[str]:
        async with EtcdStore(cluster.layout.etcd_endpoint) as store:
            found, _ = await records.instances(store).list()
            return sorted(i.record.instance_id for i in found if i.record.model == model)

    return asyncio.run(read())


def step_numbers(client: openai.OpenAI, job_id: str) -> list[int]:
    events = reversed(client.fine_tuning.jobs.list_events(job_id, limit=100).data)
    return [
        int(e.message.split("/")[0].removeprefix("Step "))
        for e in events
        if e.message.startswith("Step ")
    ]


def pods_of(cluster: RunningCluster, task_id: str, kind: str = "pods") -> list[str]:
    """Ids of the pods (or, with kind="instances", the serving instances) of a task."""

    async def read() -> list[str]:
        async with EtcdStore(cluster.layout.etcd_endpoint) as store:
            if kind == "instances":
                found, _ = await records.instances(store).list()
                return [i.record.instance_id for i in found if i.record.task_id == task_id]
            pods, _ = await records.pods(store).list()
            return [p.record.pod_id for p in pods if p.record.task_id == task_id]

    return asyncio.run(read())


def long_job(client: openai.OpenAI) -> str:
    file_id = upload(client, dataset())
    hyper = {"n_epochs": 50, "batch_size": 4, "learning_rate_multiplier": 1}
    return client.fine_tuning.jobs.create(
        model=MODEL, training_file=file_id, hyperparameters=hyper
    ).id


def test_cancel_stops_training_and_frees_the_pod(
    client: openai.OpenAI, cluster: RunningCluster
) -> None:
    job_id = long_job(client)
    try:
        wait_for(lambda: len(step_numbers(client, job_id)) >= 2, 180, "training did not start")
        # The pod trains without a serving engine: no instance of the base model is registered.
        assert pods_of(cluster, f"{job_id}-train")
        assert pods_of(cluster, f"{job_id}-train", kind="instances") == []
        assert client.fine_tuning.jobs.cancel(job_id).status == "cancelled"
        wait_for(lambda: not pods_of(cluster, f"{job_id}-train"), 60, "the pod was not released")
        steps = len(step_numbers(client, job_id))
        time.sleep(2)
        assert len(step_numbers(client, job_id)) == steps
        assert client.fine_tuning.jobs.retrieve(job_id).status == "cancelled"
    finally:
        end_job(client, cluster, job_id)  # a failed check leaves no training behind


def end_job(client: openai.OpenAI, cluster: RunningCluster, job_id: str) -> None:
    """Cancels a job unless it already ended, and waits until its training pod is released."""

    def ended() -> str | None:
        try:
            job = client.fine_tuning.jobs.retrieve(job_id)
            if job.status not in ("succeeded", "failed", "cancelled"):
                job = client.fine_tuning.jobs.cancel(job_id)
        except openai.APIStatusError as exc:
            if exc.status_code != 503:  # jobmgr restarting: try again
                raise
            return None
        return job.status

    wait_for(ended, 60, f"{job_id} could not be cancelled")
    wait_for(lambda: not pods_of(cluster, f"{job_id}-train"), 60, "the pod was not released")


def jobmgr_restarted(cluster: RunningCluster, old_pid: int) -> bool:
    """Whether `up` has replaced the jobmgr process `old_pid` with a serving one."""
    pid = cluster.pids().get("jobmgr")
    address = cluster.layout.address("jobmgr")
    return bool(pid and pid != old_pid and asyncio.run(check_health(address)) == "SERVING")


def test_jobmgr_restart_resumes_from_the_last_checkpoint(
    client: openai.OpenAI, cluster: RunningCluster
) -> None:
    job_id = long_job(client)
    checkpoints = wait_for(
        lambda: client.fine_tuning.jobs.checkpoints.list(job_id).data, 180, "no checkpoint"
    )
    old_pid = cluster.pids()["jobmgr"]
    os.kill(old_pid, signal.SIGKILL)
    lay = cluster.layout
    env = {
        **os.environ,
        "DEEPSERVE_ETCD_ENDPOINT": lay.etcd_endpoint,
        "DEEPSERVE_REDIS_URL": lay.redis_url,
        "DEEPSERVE_HOST": lay.host,
        "DEEPSERVE_LEASE_TTL_S": "2",
        "DEEPSERVE_JOBMGR_GRPC_PORT": str(free_port()),
        "DEEPSERVE_JOBMGR_PODPOOL_ADDRESS": lay.address("podpool"),
    }
    proc = ManagedProcess(
        "jobmgr-2",
        [sys.executable, "-m", "deepserve.jobmgr"],
        lay.log_dir / "jobmgr-2.log",
        env=env,
    ).start()
    try:

        def first_step_after_resume() -> tuple[str, str] | None:
            try:
                listed = client.fine_tuning.jobs.list_events(job_id, limit=100)
            except openai.APIStatusError as exc:
                # The gateway reads jobs through jobmgr: while `up` restarts the killed one,
                # the job API answers 503 (Retry-After), and a client tries again.
                if exc.status_code != 503:
                    raise
                return None
            events = reversed(listed.data)
            resume = None
            for event in events:
                if event.message.startswith("resuming from"):
                    resume = event.message
                elif resume and event.message.startswith("Step "):
                    return resume, event.message
            return None

        resume, first_step = wait_for(first_step_after_resume, 120, "the job did not resume")
        resumed_from = int(resume.rsplit("step-", 1)[1].split(".")[0])
        assert resumed_from >= checkpoints[0].step_number
        assert first_step.startswith(f"Step {resumed_from + 1}/")
    finally:
        proc.stop()
        # What this test changed is put back: `up` restarted the jobmgr it killed, which serves
        # the job API alone again, and the long job ends (its pod back in the pool).
        wait_for(lambda: jobmgr_restarted(cluster, old_pid), 60, "up did not restart jobmgr")
        end_job(client, cluster, job_id)


def cli(cluster: RunningCluster, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "deepserve.cli.main",
            *argv,
            "--run-dir",
            str(cluster.layout.run_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_adapter_registered_with_the_cli_loads_on_its_first_request_inside_its_trace(
    client: openai.OpenAI, cluster: RunningCluster, tmp_path: Path
) -> None:
    base = default_cache_dir() / MODEL
    adapter = write_synthetic_adapter(base, tmp_path / "cli-lora", rank=8, seed=3)
    done = cli(
        cluster,
        "adapters", "register", "cli-lora",
        "--model", MODEL, "--path", str(adapter), "--tenant", "anonymous",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "cli-lora" in cli(cluster, "adapters", "list", "--tenant", "anonymous").stdout
    too_big = write_synthetic_adapter(base, tmp_path / "big", rank=64, seed=4)
    refused = cli(
        cluster,
        "adapters", "register", "big",
        "--model", MODEL, "--path", str(too_big), "--tenant", "anonymous",
    )  # fmt: skip
    assert refused.returncode == 1 and "exceeds the limit" in refused.stderr

    def listed() -> bool:
        return "cli-lora" in [m.id for m in client.models.list().data]

    wait_for(listed, 30, "the adapter was not listed")
    reply = client.chat.completions.create(
        model="cli-lora",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=4,
        extra_headers={"x-request-id": "lora-first-1"},
    )
    assert reply.model == "cli-lora" and reply.usage and reply.usage.completion_tokens == 4

    def load_span() -> bool:
        try:
            spans = find_trace(read_spans(cluster.layout.telemetry_dir), "lora-first-1")
        except Exception:
            return False
        return "engine.adapter_load" in {s["name"] for s in spans}

    wait_for(load_span, 30, "the adapter's load is not in the request's trace")

    assert cli(cluster, "adapters", "delete", "cli-lora", "--tenant", "anonymous").returncode == 0
    wait_for(lambda: not listed(), 30, "the adapter was still listed")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="cli-lora", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
