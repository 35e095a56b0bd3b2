"""The rpc layer in-process: domain errors become status codes (with field and retry-after) on
unary and streaming RPCs, come back as the same domain errors, and health/reflection are served."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deepserve import errors
from deepserve.rpc.client import insecure_channel
from deepserve.rpc.errors import error_from_rpc
from deepserve.rpc.server import start_grpc_server
from deepserve.v1 import jobmgr_pb2 as pb
from deepserve.v1 import jobmgr_pb2_grpc


class FailingJobs(jobmgr_pb2_grpc.JobManagerServiceServicer):
    async def GetJob(self, request, context):  # type: ignore[no-untyped-def]
        if request.job_id == "missing":
            raise errors.NotFound("job 'missing' not found", field="job_id")
        if request.job_id == "busy":
            raise errors.ResourceExhausted("too many", retry_after_s=2.5)
        if request.job_id == "boom":
            raise RuntimeError("kaboom")
        return pb.GetJobResponse(job=pb.Job(job_id=request.job_id))

    async def WatchJobs(self, request, context):  # type: ignore[no-untyped-def]
        yield pb.WatchJobsResponse(job=pb.Job(job_id="first"))
        raise errors.Unavailable("etcd went away")


@pytest.fixture
async def address():
    servicer = FailingJobs()
    service = await start_grpc_server(
        [lambda s: jobmgr_pb2_grpc.add_JobManagerServiceServicer_to_server(servicer, s)],
        ["deepserve.v1.JobManagerService"],
        host="127.0.0.1",
        port=0,
        metrics_label="rpc-test",
    )
    yield f"127.0.0.1:{service.port}"
    await service.server.stop(0)


async def test_domain_errors_map_to_status_codes_and_back(address: str) -> None:
    async with insecure_channel(address, traced=False) as channel:
        stub = jobmgr_pb2_grpc.JobManagerServiceStub(channel)
        assert (await stub.GetJob(pb.GetJobRequest(job_id="ok"))).job.job_id == "ok"

        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetJob(pb.GetJobRequest(job_id="missing"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        err = error_from_rpc(missing.value)
        assert isinstance(err, errors.NotFound) and err.field == "job_id"
        assert err.message == "job 'missing' not found"

        with pytest.raises(grpc.aio.AioRpcError) as busy:
            await stub.GetJob(pb.GetJobRequest(job_id="busy"))
        limited = error_from_rpc(busy.value)
        assert isinstance(limited, errors.ResourceExhausted) and limited.retry_after_s == 2.5

        with pytest.raises(grpc.aio.AioRpcError) as boom:
            await stub.GetJob(pb.GetJobRequest(job_id="boom"))
        assert boom.value.code() == grpc.StatusCode.INTERNAL
        assert "kaboom" in (boom.value.details() or "")


async def test_streaming_rpc_ends_with_the_mapped_status(address: str) -> None:
    async with insecure_channel(address, traced=False) as channel:
        stub = jobmgr_pb2_grpc.JobManagerServiceStub(channel)
        seen = []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for change in stub.WatchJobs(pb.WatchJobsRequest()):
                seen.append(change.job.job_id)
        assert seen == ["first"]
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_health_is_serving_for_the_server_and_its_service(address: str) -> None:
    async with insecure_channel(address, traced=False) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "deepserve.v1.JobManagerService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_calls_are_counted_by_method_and_code_in_prometheus_text(address: str) -> None:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from deepserve.metrics import registry

    async with insecure_channel(address, traced=False) as channel:
        stub = jobmgr_pb2_grpc.JobManagerServiceStub(channel)
        await stub.GetJob(pb.GetJobRequest(job_id="ok"))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GetJob(pb.GetJobRequest(job_id="missing"))
    families = {
        f.name: f for f in text_string_to_metric_families(generate_latest(registry()).decode())
    }
    counts = {
        s.labels["code"]: s.value
        for s in families["deepserve_rpc_requests"].samples
        if s.name == "deepserve_rpc_requests_total"
        and s.labels["service"] == "rpc-test"
        and s.labels["method"] == "GetJob"
    }
    assert counts["OK"] >= 1 and counts["NOT_FOUND"] >= 1
    latency = [
        s
        for s in families["deepserve_rpc_latency_seconds"].samples
        if s.name.endswith("_count")
        and s.labels["service"] == "rpc-test"
        and s.labels["method"] == "GetJob"
    ]
    # Other tests of this file call other methods first; only GetJob's two calls count here.
    assert len(latency) == 1 and latency[0].value >= 2
