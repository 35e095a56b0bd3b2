"""The Batch API through the official `openai` client on a real local cluster (`deepserve up`:
etcd, valkey, scheduler, jobmgr, podpool, gateway and a flowserve pod serving a tiny Llama).

A batch of 100 chat requests yields 100 output lines matched by custom_id while interactive
requests keep being served; bad requests are refused naming the field; cancel ends a running
batch as cancelled with its partial output.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from deepserve.store.redis_store import RedisStore
from deepserve.tenancy.usage import UsageMeter
from tests.cluster_harness import RunningCluster, local_cluster
from tests.tiny_model import make_tiny_llama

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
TERMINAL = ("completed", "failed", "cancelled", "expired")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    root = tmp_path_factory.mktemp("batch")
    model = make_tiny_llama(root / "tiny-llama")
    saved = os.environ.get("DEEPSERVE_FILES_ROOT")
    os.environ["DEEPSERVE_FILES_ROOT"] = str(root / "files")
    try:
        with local_cluster(root / "run", model=str(model)) as running:
            running.model = str(model)  # type: ignore[attr-defined]
            yield running
    finally:
        if saved is None:
            os.environ.pop("DEEPSERVE_FILES_ROOT", None)
        else:
            os.environ["DEEPSERVE_FILES_ROOT"] = saved


@pytest.fixture(scope="module")
def client(cluster: RunningCluster) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{cluster.layout.gateway_url}/v1", api_key="EMPTY", timeout=120, max_retries=0
    )


@pytest.fixture(scope="module")
def model(cluster: RunningCluster, client: openai.OpenAI) -> str:
    name: str = cluster.model  # type: ignore[attr-defined]
    deadline = time.monotonic() + 60
    while True:  # the deployment's instance may still be registering
        try:
            chat(client, name, "warm up")
            return name
        except openai.APIStatusError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def chat(client: openai.OpenAI, model: str, text: str) -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], max_tokens=8, temperature=0
    )
    return reply.choices[0].message.content or ""


def batch_input(model: str, n: int, max_tokens: int) -> bytes:
    rows = [
        {
            "custom_id": f"request-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": model,
                "messages": [{"role": "user", "content": f"Say something about {i}."}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            },
        }
        for i in range(n)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def start_batch(client: openai.OpenAI, data: bytes) -> Any:
    file_id = client.files.create(file=("batch.jsonl", io.BytesIO(data)), purpose="batch").id
    return client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )


def wait_terminal(client: openai.OpenAI, batch_id: str, timeout_s: float = 180) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in TERMINAL:
            return batch
        time.sleep(0.2)
    raise TimeoutError(f"batch {batch_id} still {batch.status}")


def lines(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if not file_id:
        return []
    text = client.files.content(file_id).text
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def usage_totals(cluster: RunningCluster, model: str) -> tuple[int, int]:
    """(requests, completion tokens) on `model`, over every tenant."""

    async def read() -> tuple[int, int]:
        async with RedisStore(cluster.layout.redis_url) as redis:
            rows = await UsageMeter(redis.client).read(model=model)
        return sum(r.requests for r in rows), sum(r.completion_tokens for r in rows)

    return asyncio.run(read())


def test_batch_of_100_is_answered_while_interactive_requests_are_served(
    cluster: RunningCluster, client: openai.OpenAI, model: str
) -> None:
    requests_before, tokens_before = usage_totals(cluster, model)
    batch = start_batch(client, batch_input(model, 100, max_tokens=24))
    assert batch.status == "validating" and batch.request_counts.total == 100
    # Interactive requests, one after another, for as long as the batch runs; one counts when
    # it completed while the batch was still in progress (not all its lines answered).
    served_during_batch: list[float] = []
    interactive = 0
    while True:
        started = time.monotonic()
        chat(client, model, "interactive")
        interactive += 1
        seconds = time.monotonic() - started
        current = client.batches.retrieve(batch.id)
        if current.status in TERMINAL or current.status == "finalizing":
            break
        if current.status == "in_progress" and current.request_counts.completed < 100:
            served_during_batch.append(seconds)
    print(f"interactive requests served during the batch: {len(served_during_batch)}, "
          f"latencies {[round(s, 3) for s in served_during_batch]}")  # fmt: skip
    assert served_during_batch, "no interactive request completed while the batch ran"
    done = wait_terminal(client, batch.id)
    assert done.status == "completed", done
    assert done.request_counts.total == 100
    assert done.request_counts.completed == 100 and done.request_counts.failed == 0
    assert done.output_file_id and done.completed_at and done.in_progress_at
    outputs = lines(client, done.output_file_id)
    assert sorted(o["custom_id"] for o in outputs) == sorted(f"request-{i}" for i in range(100))
    for out in outputs:
        assert out["error"] is None and out["response"]["status_code"] == 200
        body = out["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == model
        assert body["usage"]["completion_tokens"] == 24
    assert lines(client, done.error_file_id) == []
    assert done.id in {b.id for b in client.batches.list(limit=100).data}
    # The batch's tokens count in the tenant's usage, beside the interactive requests'.
    requests_after, tokens_after = usage_totals(cluster, model)
    assert requests_after - requests_before == 100 + interactive
    assert 100 * 24 < tokens_after - tokens_before <= 100 * 24 + interactive * 8


def test_validation_errors_are_refused(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError, match="line 2"):
        client.files.create(
            file=("bad.jsonl", io.BytesIO(batch_input(model, 1, 4) + b'{"custom_id": 1}\n')),
            purpose="batch",
        )
    file_id = client.files.create(
        file=("ok.jsonl", io.BytesIO(batch_input(model, 2, 4))), purpose="batch"
    ).id
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            completion_window="1h",  # type: ignore[arg-type]
        )
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(
            input_file_id=file_id,
            endpoint="/v1/embeddings",
            completion_window="24h",
        )
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        client.batches.create(
            input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"
        )
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")


def test_a_bad_line_lands_in_the_error_file(client: openai.OpenAI, model: str) -> None:
    data = batch_input(model, 3, 4)
    bad = {
        "custom_id": "too-long",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": "x"}], "top_p": 7},
    }
    batch = start_batch(client, data + (json.dumps(bad) + "\n").encode())
    done = wait_terminal(client, batch.id)
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (3, 1)
    errors = lines(client, done.error_file_id)
    assert [e["custom_id"] for e in errors] == ["too-long"]
    assert errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["param"] == "top_p"


def test_cancel_ends_the_batch_with_partial_output(client: openai.OpenAI, model: str) -> None:
    batch = start_batch(client, batch_input(model, 100, max_tokens=64))
    deadline = time.monotonic() + 60
    while client.batches.retrieve(batch.id).status == "validating":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait_terminal(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    outputs = lines(client, done.output_file_id)
    errors = lines(client, done.error_file_id)
    answered = done.request_counts.completed + done.request_counts.failed
    assert len(outputs) + len(errors) == answered < 100
    assert {o["custom_id"] for o in outputs} <= {f"request-{i}" for i in range(100)}
