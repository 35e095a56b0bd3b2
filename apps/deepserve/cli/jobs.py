"""`deepserve deploy | jobs | job | scale | cancel | delete`: the JobManager API from the shell."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import grpc

from deepserve.rpc.client import insecure_channel
from deepserve.rpc.errors import error_from_rpc
from deepserve.v1 import common_pb2, jobmgr_pb2_grpc
from deepserve.v1 import jobmgr_pb2 as pb

_MODES = {"colocated": pb.SERVING_MODE_COLOCATED, "disaggregated": pb.SERVING_MODE_DISAGGREGATED}
_POLICIES = {
    "deepserve": pb.ROUTING_POLICY_DEEPSERVE,
    "round_robin": pb.ROUTING_POLICY_ROUND_ROBIN,
    "random": pb.ROUTING_POLICY_RANDOM,
    "least_loaded": pb.ROUTING_POLICY_LEAST_LOADED,
}


def _phase(job: pb.Job) -> str:
    return pb.JobPhase.Name(job.status.phase).removeprefix("JOB_PHASE_").lower()


def _summary(job: pb.Job) -> str:
    which = job.spec.WhichOneof("spec")
    if which == "fine_tuning":
        ft = job.spec.fine_tuning
        return (
            f"{job.job_id:<16} {_phase(job):<10} fine-tune {ft.model} on {ft.training_file} "
            f"(tenant {ft.tenant or '-'}, step {job.status.fine_tuning.step}/"
            f"{job.status.fine_tuning.total_steps})"
        )
    if which == "batch":
        b, progress = job.spec.batch, job.status.batch
        return (
            f"{job.job_id:<16} {_phase(job):<10} batch over {b.input_file_id} "
            f"(tenant {b.tenant or '-'}, {progress.completed + progress.failed}/{progress.total})"
        )
    s = job.spec.serving
    mode = pb.ServingMode.Name(s.mode).removeprefix("SERVING_MODE_").lower()
    return (
        f"{job.job_id:<16} {_phase(job):<10} {s.model:<20} replicas {s.replicas} "
        f"[{s.min_replicas},{s.max_replicas}] ready {job.status.ready_replicas} {mode}"
    )


def _print_job(job: pb.Job, tasks: Sequence[pb.Task] = ()) -> None:
    print(_summary(job))
    if tasks:
        print("  tasks:")
    for task in tasks:
        state = pb.TaskState.Name(task.state).removeprefix("TASK_STATE_").lower()
        where = f"{task.instance_id} at {task.address}" if task.instance_id else task.message
        cold = " (cold start)" if task.cold_start else ""
        print(f"    {task.slot:<16} {state:<11} {task.pod_id:<16} {where}{cold}")
        for line in _scale_up_lines(task):
            print(f"      {line}")
    if job.events:
        print("  events:")
    for event in job.events:
        at = time.strftime("%H:%M:%S", time.localtime(event.at_unix))
        print(f"    {at}  {event.reason:<15} {event.message}")


def _autoscaling(args: argparse.Namespace) -> pb.AutoscalingPolicy:
    """From `deploy --autoscale [--scale-to-zero-after S] [--ttft-slo-ms M] [--tpot-slo-ms M]`."""
    return pb.AutoscalingPolicy(
        enabled=bool(getattr(args, "autoscale", False)),
        scale_to_zero_after_s=getattr(args, "scale_to_zero_after", 0.0) or 0.0,
        ttft_slo_ms=getattr(args, "ttft_slo_ms", 0.0) or 0.0,
        tpot_slo_ms=getattr(args, "tpot_slo_ms", 0.0) or 0.0,
    )


def _scale_up_lines(task: pb.Task) -> list[str]:
    """The task's scale-up: each of the five steps with its duration and how it was done."""
    if not task.scale_steps:
        return []
    total = sum(s.seconds for s in task.scale_steps)
    source = common_pb2.WeightsSource.Name(task.weights_source).removeprefix("WEIGHTS_SOURCE_")
    lines = [f"scale-up {total:.2f}s (weights: {source.lower()}):"]
    for n, step in enumerate(task.scale_steps, 1):
        lines.append(f"  {n} {step.step:<15} {step.seconds:7.3f}s  {step.detail}")
    return lines


async def run(args: argparse.Namespace, address: str) -> int:
    async with insecure_channel(address, traced=False) as channel:
        stub = jobmgr_pb2_grpc.JobManagerServiceStub(channel)
        try:
            if args.command == "deploy":
                spec = pb.JobSpec(
                    kind=pb.JOB_KIND_SERVING,
                    serving=pb.ServingSpec(
                        model=args.model,
                        replicas=args.replicas,
                        min_replicas=args.min_replicas,
                        max_replicas=args.max_replicas,
                        mode=_MODES[args.mode],
                        prefill_instances=args.prefill,
                        decode_instances=args.decode,
                        policy=_POLICIES[args.policy],
                        autoscaling=_autoscaling(args),
                    ),
                )
                reply = await stub.CreateJob(pb.CreateJobRequest(spec=spec, job_id=args.job_id))
                _print_job(reply.job)
            elif args.command == "jobs":
                for job in (await stub.ListJobs(pb.ListJobsRequest())).jobs:
                    print(_summary(job))
            elif args.command == "job":
                reply = await stub.GetJob(pb.GetJobRequest(job_id=args.job_id))
                _print_job(reply.job, reply.tasks)
            elif args.command == "scale":
                reply = await stub.ScaleJob(
                    pb.ScaleJobRequest(job_id=args.job_id, replicas=args.replicas)
                )
                _print_job(reply.job)
            elif args.command == "cancel":
                _print_job((await stub.CancelJob(pb.CancelJobRequest(job_id=args.job_id))).job)
            elif args.command == "delete":
                _print_job((await stub.DeleteJob(pb.DeleteJobRequest(job_id=args.job_id))).job)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
    return 0
