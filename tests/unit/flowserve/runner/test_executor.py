"""Executors: in-process with a forward thread, and SPMD tensor parallelism over worker processes."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from deepserve.errors import FailedPrecondition, InvalidArgument
from deepserve.flowserve.engine.step_plan import StepPlan, StepSequence
from deepserve.flowserve.runner.executor import ExecutorFailed, MultiprocExecutor, UniprocExecutor
from tests.unit.flowserve.runner.greedy_driver import GreedyDriver
from tests.unit.flowserve.runner.tiny_models import PROMPTS, hf_greedy, save_tiny_model

NUM_BLOCKS = 64
BLOCK_SIZE = 4
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def tp2(llama_dir: Path) -> Iterator[MultiprocExecutor]:
    executor = MultiprocExecutor(
        llama_dir, tp_size=2, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, device="cpu"
    )
    pids = _worker_pids(executor)
    yield executor
    executor.shutdown()
    assert not any(_alive(pid) for pid in pids)  # a clean exit leaves none


def _prefill(request: str, prompt: list[int], blocks: list[int]) -> StepPlan:
    return StepPlan(0, [StepSequence(request, prompt, 0, blocks)])


def test_uniproc_submit_runs_in_order_off_the_caller_thread(llama_dir: Path) -> None:
    with UniprocExecutor(
        llama_dir, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, device="cpu"
    ) as executor:
        # Two steps in flight at once, the second reading KV the first one writes.
        first = executor.submit(_prefill("a", PROMPTS[0], [5, 6]))
        second = executor.submit(StepPlan(1, [StepSequence("a", [3], 7, [5, 6])]))
        alone = UniprocExecutor(llama_dir, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)
        alone.execute(_prefill("a", PROMPTS[0], [1, 2]))
        expected = alone.execute(StepPlan(1, [StepSequence("a", [3], 7, [1, 2])]))
        alone.shutdown()
        assert first.result().shape == (1, 256)
        assert torch.equal(second.result(), expected)
        host = executor.copy_to_host([5, 6])
        executor.load_from_host([9, 10], host)
        assert torch.equal(executor.copy_to_host([9, 10]), host)
        with pytest.raises(InvalidArgument):
            executor.submit(_prefill("b", PROMPTS[2], [1]))  # 13 tokens need 4 blocks
    with pytest.raises(FailedPrecondition):
        executor.submit(_prefill("c", [1], [0]))


def test_tp2_greedy_matches_single_device(tp2: MultiprocExecutor, llama_dir: Path) -> None:
    reference = hf_greedy(llama_dir, PROMPTS, NEW_TOKENS)
    driver = GreedyDriver(tp2.execute, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)
    assert driver.generate(PROMPTS, NEW_TOKENS, chunk_size=3) == reference
    single = UniprocExecutor(llama_dir, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)
    single_driver = GreedyDriver(single.execute, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)
    assert single_driver.generate(PROMPTS, NEW_TOKENS) == reference
    single.shutdown()


def test_tp2_workers_hold_only_their_shard(tp2: MultiprocExecutor) -> None:
    workers = tp2.describe_workers()
    assert [w["rank"] for w in workers] == [0, 1]
    assert len({w["pid"] for w in workers}) == 2
    for w in workers:
        assert w["num_kv_heads"] == 1  # 2 kv heads over 2 ranks
        assert w["weight_shapes"] == {
            "qkv": (64, 64),  # 2 q heads + 1 k head + 1 v head, head_dim 16
            "o_proj": (64, 32),
            "gate_up": (128, 64),
            "down": (64, 64),
        }
    assert [w["has_lm_head"] for w in workers] == [True, False]


def test_tp2_host_round_trip_gathers_all_kv_heads(tp2: MultiprocExecutor) -> None:
    tp2.execute(_prefill("h", PROMPTS[2], [40, 41, 42, 43]))
    host = tp2.copy_to_host([40, 41, 42, 43])
    assert host.shape == (2, 2, 4, BLOCK_SIZE, 2, 16)  # both ranks' kv heads
    assert host.abs().sum() > 0
    tp2.load_from_host([50, 51, 52, 53], host)
    assert torch.equal(tp2.copy_to_host([50, 51, 52, 53]), host)
    # The moved KV decodes exactly like the original.
    step = StepPlan(1, [StepSequence("h", [4], 13, [40, 41, 42, 43])])
    moved = StepPlan(2, [StepSequence("h", [4], 13, [50, 51, 52, 53])])
    assert torch.equal(tp2.execute(step), tp2.execute(moved))


def test_indivisible_tp_size_fails_before_spawning(tmp_path: Path) -> None:
    model_dir = save_tiny_model(
        tmp_path, hidden_size=96, num_attention_heads=6, num_key_value_heads=3
    )
    with pytest.raises(InvalidArgument) as info:
        MultiprocExecutor(model_dir, tp_size=2, num_blocks=8, block_size=4, device="cpu")
    assert info.value.field == "tp_size"


@pytest.mark.timeout(120)
def test_killed_worker_makes_execute_raise_and_shutdown_cleans_up(llama_dir: Path) -> None:
    executor = MultiprocExecutor(
        llama_dir, tp_size=2, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, device="cpu"
    )
    pids = _worker_pids(executor)
    try:
        assert executor.execute(_prefill("a", PROMPTS[0], [1, 2])).shape == (1, 256)
        in_flight = executor.submit(StepPlan(1, [StepSequence("a", [3], 7, [1, 2])]))
        os.kill(pids[1], signal.SIGKILL)
        try:
            in_flight.result(timeout=60)  # may have finished before the kill landed
        except ExecutorFailed:
            pass
        with pytest.raises(ExecutorFailed):
            executor.execute(_prefill("b", PROMPTS[1], [3]))
        with pytest.raises(ExecutorFailed):  # stays failed
            executor.submit(_prefill("c", PROMPTS[1], [4]))
    finally:
        executor.shutdown()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids)


def _worker_pids(executor: MultiprocExecutor) -> list[int]:
    return [worker["pid"] for worker in executor.describe_workers()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0; treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
