"""A disaggregated deployment served through the gateway. Starts real processes via
`deepserve up`: etcd, valkey-server, scheduler, jobmgr, podpool (with its flowserve pods) and
the gateway; the job places a prefill and a decode instance of a tiny random Llama."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator

import pytest

from deepserve import records
from deepserve.records import Role
from deepserve.rpc.client import insecure_channel
from deepserve.store.etcd import EtcdStore
from deepserve.v1 import common_pb2, flowserve_pb2, flowserve_pb2_grpc, jobmgr_pb2, jobmgr_pb2_grpc
from tests.cluster_harness import RunningCluster, local_cluster
from tests.tiny_model import make_tiny_llama

pytestmark = pytest.mark.integration

PROMPT = [(7 * i) % 200 + 3 for i in range(120)]  # long prompt, short output: disaggregate


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    model = make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")
    with local_cluster(tmp_path_factory.mktemp("up"), extra_args=("--warm-pods", "2")) as c:
        c.model = str(model)  # type: ignore[attr-defined]
        yield c


async def instances(cluster: RunningCluster) -> list[records.InstanceRecord]:
    async with EtcdStore(cluster.layout.etcd_endpoint) as etcd:
        found, _ = await records.instances(etcd).list()
    return [v.record for v in found]


def complete(cluster: RunningCluster) -> dict:
    body = json.dumps(
        {"model": cluster.model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}  # type: ignore[attr-defined]
    ).encode()
    request = urllib.request.Request(
        f"{cluster.layout.gateway_url}/v1/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


async def test_disaggregated_job_serves_through_the_gateway_with_kv_handoff(
    cluster: RunningCluster,
) -> None:
    spec = jobmgr_pb2.JobSpec(
        kind=jobmgr_pb2.JOB_KIND_SERVING,
        serving=jobmgr_pb2.ServingSpec(
            model=cluster.model,  # type: ignore[attr-defined]
            replicas=1,
            mode=jobmgr_pb2.SERVING_MODE_DISAGGREGATED,
            prefill_instances=1,
            decode_instances=1,
        ),
    )
    async with insecure_channel(cluster.layout.address("jobmgr"), traced=False) as ch:
        await jobmgr_pb2_grpc.JobManagerServiceStub(ch).CreateJob(
            jobmgr_pb2.CreateJobRequest(spec=spec, job_id="pd-e2e"), timeout=10
        )
    deadline = time.monotonic() + 90
    while {i.role for i in await instances(cluster)} != {Role.PREFILL, Role.DECODE}:
        assert time.monotonic() < deadline, await instances(cluster)
        await asyncio.sleep(0.25)
    live = await instances(cluster)
    prefill = next(i for i in live if i.role == Role.PREFILL)
    decode = next(i for i in live if i.role == Role.DECODE)

    reply = await asyncio.to_thread(complete, cluster)
    usage = reply["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(PROMPT), 4)

    async with insecure_channel(decode.address, traced=False) as ch:
        stats = await flowserve_pb2_grpc.FlowServeServiceStub(ch).GetStats(
            flowserve_pb2.GetStatsRequest()
        )
    assert stats.kv_received.transfers >= 1, "the decode instance computed the prompt itself"
    assert stats.kv_received.blocks >= len(PROMPT) // 16
    assert stats.kv_blocks_used == 0  # nothing leaked after the request

    # The same prompt run wholly on one instance gives the same greedy text.
    async with insecure_channel(prefill.address, traced=False) as ch:
        replies = [
            r
            async for r in flowserve_pb2_grpc.FlowServeServiceStub(ch).Generate(
                flowserve_pb2.GenerateRequest(
                    request_id="colocated-check",
                    prompt_token_ids=PROMPT,
                    sampling=common_pb2.SamplingParams(temperature=0, max_tokens=4),
                    detokenize=True,
                ),
                timeout=60,
            )
        ]
    assert reply["choices"][0]["text"] == "".join(r.text for r in replies)
