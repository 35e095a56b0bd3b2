"""SPMD executors: run each StepPlan on one device, or on tp_size tensor-parallel workers.

Both expose the same interface. `submit` returns a Future at once so the engine can plan the
next step while this one runs; calls are executed strictly in submission order.

`MultiprocExecutor` is the paper's SPMD layout: the master (the engine process) pickles each
step plan once and sends it down one pipe per worker; every worker runs the same forward pass
on its weight shard (all-reducing through torch.distributed) and rank 0 sends the logits back. A
collector thread reads replies in order and watches every worker's process sentinel, so a dead
worker fails the pending futures within moments instead of hanging the engine.
"""

from __future__ import annotations

import os
import pickle
import queue
import threading
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deepserve.errors import FailedPrecondition, Unavailable
from deepserve.flowserve.engine.step_plan import StepPlan
from deepserve.flowserve.lora.host_weights import AdapterWeights
from deepserve.flowserve.model.config import ModelConfig
from deepserve.flowserve.runner.device import DevicePlatform, detect_platform, platform_of
from deepserve.flowserve.runner.inputs import validate_plan
from deepserve.flowserve.runner.model_runner import ModelRunner
from deepserve.flowserve.runner.step_chain import StepChain, StepSampler, refuse_chained
from deepserve.flowserve.runner.step_trace import StepTrace, run_step, step_trace_at
from deepserve.processes import free_port

# The kv-heads axis of a copy_to_host tensor [layers, 2, blocks, block_size, kv_heads, head_dim];
# tensor-parallel ranks each hold a contiguous share of it.
_KV_HEADS_DIM = -2


T = TypeVar("T")


class ExecutorFailed(Unavailable):
    """A worker died, hung or raised; this executor is unusable and must be rebuilt."""


class Executor(ABC):
    """Runs StepPlans on the device(s) and returns rank 0's logits; calls run in order."""

    config: ModelConfig
    num_blocks: int
    block_size: int

    @abstractmethod
    def submit(self, plan: StepPlan) -> Future[torch.Tensor]:
        """Queue one step; the future yields float32 logits [needs_logits seqs, vocab]: on the
        model's device from an in-process runner (sampled there), on the host from workers."""

    def execute(self, plan: StepPlan) -> torch.Tensor:
        return self.submit(plan).result()

    @abstractmethod
    def copy_to_host(self, block_ids: Sequence[int]) -> torch.Tensor:
        """KV of the blocks on CPU, all kv heads: [layers, 2, blocks, block_size, kv_heads, dim]."""

    @abstractmethod
    def load_from_host(self, block_ids: Sequence[int], tensor: torch.Tensor) -> None:
        """Write a copy_to_host-shaped tensor into the given device blocks."""

    def load_adapter(
        self, slot: int, weights: AdapterWeights, *, num_slots: int, max_rank: int
    ) -> Future[None]:
        """Queue copying a LoRA adapter into a device slot, in order with the steps."""
        raise FailedPrecondition("LoRA adapters are served by single-device instances only")

    @abstractmethod
    def shutdown(self) -> None:
        """Stop workers and release devices; safe to call twice."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()


def _resolve_platform(device: str | torch.device | None) -> DevicePlatform:
    if isinstance(device, torch.device):
        return platform_of(device)
    return detect_platform(device)


def _build_runner(
    threads: int,
    model_dir: str | Path,
    device: torch.device,
    dtype: torch.dtype | str | None,
    num_blocks: int,
    block_size: int,
) -> ModelRunner:
    torch.set_num_threads(threads)  # this thread's OpenMP team
    return ModelRunner(model_dir, device, dtype, num_blocks, block_size)


class UniprocExecutor(Executor):
    """The model runner in this process; steps run on one dedicated thread (torch drops the GIL)."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        num_blocks: int,
        block_size: int,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        threads: int | None = None,
        step_trace_path: str | Path | None = None,
    ) -> None:
        platform = _resolve_platform(device)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flowserve-forward")
        # The model is built on the forward thread too. On CPU every thread that runs torch
        # ops gets its own OpenMP team; a second team (left by loading the weights on the
        # caller's thread) keeps cores busy and made one-request decode steps ~40% slower.
        # `threads` defaults to the caller's own setting.
        threads = threads or torch.get_num_threads()
        self.runner = self._thread.submit(
            _build_runner, threads, model_dir, platform.device(), dtype, num_blocks, block_size
        ).result()
        self.config = self.runner.config
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._step_trace = step_trace_at(step_trace_path)
        self._chain = StepChain()
        self._closed = False

    def submit(self, plan: StepPlan) -> Future[torch.Tensor]:
        self._check_open()
        validate_plan(plan, num_blocks=self.num_blocks, block_size=self.block_size)
        refuse_chained(plan)
        return self._thread.submit(self._run_step, plan)

    def submit_sampled(self, plan: StepPlan, sample: StepSampler[T]) -> Future[T]:
        """Queue one step that `sample` samples on the forward thread; the future yields what
        it keeps. A chained plan queued right behind it starts from its tokens (step_chain.py)."""
        self._check_open()
        validate_plan(plan, num_blocks=self.num_blocks, block_size=self.block_size)
        return self._thread.submit(self._chain.run, self._run_step, plan, sample)

    def _run_step(self, plan: StepPlan) -> torch.Tensor:
        # The runner's execute is looked up per step: benches wrap it to time the forward pass.
        return run_step(self._step_trace, self.runner.execute, plan)

    def run_on_forward_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs `fn` on the thread that runs the model (e.g. a benchmark's bandwidth probe, so
        it shares the forward's OpenMP team instead of starting a competing one)."""
        self._check_open()
        return self._thread.submit(fn, *args).result()

    def copy_to_host(self, block_ids: Sequence[int]) -> torch.Tensor:
        self._check_open()
        # Through the same thread, so it sees the KV written by every step submitted before it.
        return self._thread.submit(self.runner.copy_to_host, list(block_ids)).result()

    def load_from_host(self, block_ids: Sequence[int], tensor: torch.Tensor) -> None:
        self._check_open()
        self._thread.submit(self.runner.load_from_host, list(block_ids), tensor).result()

    def load_adapter(
        self, slot: int, weights: AdapterWeights, *, num_slots: int, max_rank: int
    ) -> Future[None]:
        self._check_open()
        # After every step submitted so far, before every later one: the engine only picks a
        # slot no running request reads, so neither side sees a half-written adapter.
        return self._thread.submit(
            lambda: self.runner.load_adapter(slot, weights, num_slots=num_slots, max_rank=max_rank)
        )

    def shutdown(self) -> None:
        self._closed = True
        self._thread.shutdown(wait=True)
        if self._step_trace is not None:
            self._step_trace.close()

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition("executor is shut down")


@dataclass(frozen=True, slots=True)
class _WorkerArgs:
    model_dir: str
    device_kind: str
    dtype: torch.dtype | str | None
    num_blocks: int
    block_size: int
    tp_rank: int
    tp_size: int
    port: int
    num_threads: int
    collective_timeout_s: float
    step_trace_path: str | None = None  # rank 0's step log


@dataclass(slots=True)
class _Call:
    method: str
    future: Future[Any]


class MultiprocExecutor(Executor):
    """tp_size worker processes, one per device, each running the forward on its weight shard."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        tp_size: int,
        num_blocks: int,
        block_size: int,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        startup_timeout_s: float = 600.0,
        step_timeout_s: float | None = None,
        collective_timeout_s: float = 600.0,
        step_trace_path: str | Path | None = None,
    ) -> None:
        self.config = ModelConfig.from_model_dir(model_dir)
        self.config.check_tensor_parallel(tp_size)
        platform = _resolve_platform(device)
        if platform.kind != "cpu" and platform.device_count() < tp_size:
            raise FailedPrecondition(
                f"tp_size={tp_size} needs {tp_size} {platform.kind} devices, "
                f"found {platform.device_count()}"
            )
        self.tp_size = tp_size
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.step_timeout_s = step_timeout_s
        self._failure: ExecutorFailed | None = None
        self._closed = False
        self._send_lock = threading.Lock()
        self._calls: queue.Queue[_Call | None] = queue.Queue()

        context = mp.get_context("spawn")
        port = free_port()
        threads = max(1, (os.cpu_count() or 1) // tp_size)
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        for rank in range(tp_size):
            parent_end, child_end = context.Pipe(duplex=True)
            args = _WorkerArgs(
                model_dir=str(model_dir),
                device_kind=platform.kind,
                dtype=dtype,
                num_blocks=num_blocks,
                block_size=block_size,
                tp_rank=rank,
                tp_size=tp_size,
                port=port,
                num_threads=threads,
                collective_timeout_s=collective_timeout_s,
                # Every rank runs every step; rank 0's times stand for the step.
                step_trace_path=str(step_trace_path) if step_trace_path and rank == 0 else None,
            )
            proc = context.Process(
                target=_worker_main,
                args=(args, child_end),
                name=f"flowserve-tp{rank}",
                daemon=True,
            )
            proc.start()
            child_end.close()  # the worker holds it; our copy would hide its death from recv
            self._conns.append(parent_end)
            self._procs.append(proc)
        try:
            self._receive_all("startup", startup_timeout_s)
        except BaseException:
            self._kill_workers()
            raise
        self._collector = threading.Thread(
            target=self._collect, name="flowserve-executor-collector", daemon=True
        )
        self._collector.start()

    def submit(self, plan: StepPlan) -> Future[torch.Tensor]:
        validate_plan(plan, num_blocks=self.num_blocks, block_size=self.block_size)
        refuse_chained(plan)  # the workers never see the master's sampled tokens
        payload = pickle.dumps(("execute", (plan,)), protocol=pickle.HIGHEST_PROTOCOL)
        return self._call("execute", [payload] * self.tp_size)

    def copy_to_host(self, block_ids: Sequence[int]) -> torch.Tensor:
        payload = pickle.dumps(("copy_to_host", (list(block_ids),)))
        return self._call("copy_to_host", [payload] * self.tp_size).result()

    def load_from_host(self, block_ids: Sequence[int], tensor: torch.Tensor) -> None:
        shards = tensor.chunk(self.tp_size, dim=_KV_HEADS_DIM)
        payloads = [
            pickle.dumps(("load_from_host", (list(block_ids), shard.contiguous())))
            for shard in shards
        ]
        self._call("load_from_host", payloads).result()

    def describe_workers(self) -> list[dict[str, Any]]:
        """Per rank: pid, device, kv heads and the shapes of its layer-0 weights (diagnostics)."""
        payload = pickle.dumps(("describe", ()))
        return self._call("describe", [payload] * self.tp_size).result()

    def shutdown(self) -> None:
        if self._closed:
            return
        if self._failure is None:
            try:
                self._call("shutdown", [pickle.dumps(("shutdown", ()))] * self.tp_size).result(
                    timeout=30
                )
            except Exception:  # a broken worker is killed below either way
                pass
        self._closed = True
        self._calls.put(None)
        for proc in self._procs:
            proc.join(timeout=10)
        self._kill_workers()
        self._collector.join(timeout=10)
        for conn in self._conns:
            conn.close()

    def _call(self, method: str, payloads: list[bytes]) -> Future[Any]:
        with self._send_lock:
            if self._failure is not None:
                raise self._failure
            if self._closed:
                raise FailedPrecondition("executor is shut down")
            future: Future[Any] = Future()
            try:
                for conn, payload in zip(self._conns, payloads, strict=True):
                    conn.send_bytes(payload)
            except OSError as exc:
                # A dead worker's pipe end is closed; the collector reports which one died.
                future.set_exception(ExecutorFailed(f"cannot reach executor worker: {exc}"))
                return future
            self._calls.put(_Call(method, future))
            return future

    def _collect(self) -> None:
        while (call := self._calls.get()) is not None:
            if self._failure is not None:
                call.future.set_exception(self._failure)
                continue
            try:
                replies = self._receive_all(call.method, self.step_timeout_s)
            except Exception as exc:  # anything but a clean reply leaves the ranks out of step
                failure = (
                    exc
                    if isinstance(exc, ExecutorFailed)
                    else ExecutorFailed(f"executor reply to {call.method} unreadable: {exc!r}")
                )
                self._failure = failure
                self._kill_workers()
                call.future.set_exception(failure)
                continue
            if call.method == "copy_to_host":
                call.future.set_result(torch.cat(replies, dim=_KV_HEADS_DIM))
            elif call.method == "describe":
                call.future.set_result(replies)
            else:
                call.future.set_result(replies[0])

    def _receive_all(self, method: str, timeout_s: float | None) -> list[Any]:
        """One reply per rank, in rank order; raise ExecutorFailed on death, error or timeout."""
        replies: dict[int, Any] = {}
        conn_rank = {id(conn): rank for rank, conn in enumerate(self._conns)}
        sentinel_rank = {proc.sentinel: rank for rank, proc in enumerate(self._procs)}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while len(replies) < self.tp_size:
            waiting = [c for r, c in enumerate(self._conns) if r not in replies]
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = wait([*waiting, *sentinel_rank], timeout=remaining)
            if not ready:
                raise ExecutorFailed(f"executor workers gave no reply to {method} in {timeout_s}s")
            # Drain replies before looking at deaths: a worker may answer and then exit.
            for item in ready:
                if isinstance(item, Connection):
                    rank = conn_rank[id(item)]
                    replies[rank] = self._read_reply(rank, method, item)
            for item in ready:
                if isinstance(item, int):
                    rank = sentinel_rank[item]
                    if method == "shutdown" and rank in replies:
                        continue
                    raise ExecutorFailed(
                        f"executor worker rank {rank} exited (code {self._exit_code(rank)})"
                    )
        return [replies[r] for r in range(self.tp_size)]

    def _read_reply(self, rank: int, method: str, conn: Connection) -> Any:
        try:
            status, value = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            raise ExecutorFailed(
                f"executor worker rank {rank} died (code {self._exit_code(rank)})"
            ) from None
        if status != "ok":
            raise ExecutorFailed(f"executor worker rank {rank} failed in {method}:\n{value}")
        return value

    def _exit_code(self, rank: int) -> int | None:
        # The sentinel fires before the process is reaped; a short join makes exitcode readable.
        self._procs[rank].join(timeout=1)
        return self._procs[rank].exitcode

    def _kill_workers(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
        for proc in self._procs:
            proc.join(timeout=10)


def _reply(conn: Connection, status: str, value: Any) -> None:
    conn.send_bytes(pickle.dumps((status, value), protocol=pickle.HIGHEST_PROTOCOL))


def _worker_main(args: _WorkerArgs, conn: Connection) -> None:
    """A tensor-parallel worker: join the process group, load the shard, serve calls in order."""
    try:
        platform = detect_platform(args.device_kind)
        platform.set_current(args.tp_rank)
        if platform.kind == "cpu":
            torch.set_num_threads(args.num_threads)
        dist.init_process_group(
            backend=platform.collective_backend,
            init_method=f"tcp://127.0.0.1:{args.port}",
            rank=args.tp_rank,
            world_size=args.tp_size,
            timeout=timedelta(seconds=args.collective_timeout_s),
        )
        runner = ModelRunner(
            args.model_dir,
            platform.device(args.tp_rank),
            args.dtype,
            args.num_blocks,
            args.block_size,
            tp_rank=args.tp_rank,
            tp_size=args.tp_size,
        )
    except BaseException:
        _reply(conn, "error", traceback.format_exc())
        return
    _reply(conn, "ok", None)
    trace = step_trace_at(args.step_trace_path)
    try:
        _serve(runner, conn, args.tp_rank, trace)
    finally:
        if trace is not None:
            trace.close()
        dist.destroy_process_group()


def _serve(
    runner: ModelRunner, conn: Connection, rank: int, trace: StepTrace | None = None
) -> None:
    while True:
        try:
            method, call_args = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return  # the master is gone
        if method == "shutdown":
            _reply(conn, "ok", None)
            return
        try:
            if method == "execute":
                # Across the process boundary on the host (this path is CPU tensor parallel).
                result: Any = run_step(trace, runner.execute, *call_args).cpu()
            elif method == "copy_to_host":
                result = runner.copy_to_host(*call_args)
            elif method == "load_from_host":
                result = runner.load_from_host(*call_args)
            elif method == "describe":
                result = _describe(runner, rank)
            else:
                raise ValueError(f"unknown executor call {method!r}")
        except Exception:
            _reply(conn, "error", traceback.format_exc())
            continue
        _reply(conn, "ok", result)


def _describe(runner: ModelRunner, rank: int) -> dict[str, Any]:
    layer = runner.model.weights.layers[0]
    return {
        "rank": rank,
        "pid": os.getpid(),
        "device": str(runner.device),
        "num_kv_heads": runner.kv_cache.num_kv_heads,
        "weight_shapes": {
            name: tuple(getattr(layer, name).shape) for name in ("qkv", "o_proj", "gate_up", "down")
        },
        "has_lm_head": runner.model.weights.lm_head is not None,
    }
