"""Chained steps: a decode step submitted before the step ahead of it is sampled.

Over the sampling fake executor, whose next token is a hash of the context it reads back from
the KV blocks, so a token fed into the wrong row, a block reused while a chained step still
writes it, or a prefix-cache entry for blocks never written changes the generated tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
import torch

from deepserve.errors import FailedPrecondition
from deepserve.flowserve.engine.async_engine import AsyncEngine, EngineConfig, EngineCore
from deepserve.flowserve.engine.request import Request
from deepserve.flowserve.engine.step_plan import StepPlan, StepSequence
from deepserve.flowserve.runner.host_transport import ExecutorHostTransport
from deepserve.flowserve.runner.step_chain import StepChain, refuse_chained
from deepserve.flowserve.testing.fake_executor import FakeExecutor, SamplingFakeExecutor
from deepserve.sampling_params import SamplingParams
from tests.unit.flowserve.test_engine import BS, PLANNING_CASES, VOCAB, config, greedy


def prompts(n: int) -> list[list[int]]:
    return [[(i * 29 + j * 5 + 1) % VOCAB for j in range(2 + (i * 13) % 31)] for i in range(n)]


def make_core(cfg: EngineConfig, eos: Sequence[int] = ()) -> tuple[EngineCore, FakeExecutor]:
    executor = SamplingFakeExecutor(cfg.num_gpu_blocks or 0, cfg.block_size, VOCAB)
    transport = ExecutorHostTransport(executor) if cfg.num_host_blocks else None
    return EngineCore(cfg, executor, eos_token_ids=eos, host_transport=transport), executor


def drain_tokens(core: EngineCore) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    for out in core.drain():
        tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


def chained_pairs(executor: FakeExecutor) -> list[tuple[StepPlan, StepPlan]]:
    """(feeding plan, chained plan) for every chained plan the executor ran."""
    by_id = {p.step_id: p for p in executor.plans}
    return [(by_id[p.fed_by_step], p) for p in executor.plans if p.fed_by_step is not None]


@pytest.mark.parametrize("overrides", PLANNING_CASES)
def test_chained_steps_generate_exactly_the_reference_tokens(overrides: dict) -> None:
    base = prompts(10)
    reqs = [(p, 12) for p in base] + [([*p, 5], 6) for p in base[::2]]
    eos = [7]
    core, executor = make_core(config(**overrides), eos)
    for i, (prompt, max_tokens) in enumerate(reqs):
        core.add_request(Request(f"r{i}", prompt, max_tokens, sampling_params=greedy(max_tokens)))
    tokens = drain_tokens(core)
    for i, (prompt, max_tokens) in enumerate(reqs):
        assert tokens[f"r{i}"] == FakeExecutor.reference(prompt, max_tokens, VOCAB, eos)
    assert core.kv_cache.stats().num_used_blocks == 0
    pairs = chained_pairs(executor)
    assert pairs, "no step was chained"
    for feeder, chained in pairs:
        # Only behind decode-only steps, and each fed row is its request's row in the feeder.
        assert all(len(s.token_ids) == 1 for s in feeder.sequences)
        feeder_rows = [s.request_id for s in feeder.sequences if s.needs_logits]
        for seq in chained.sequences:
            if seq.sampled_row >= 0:
                assert feeder_rows[seq.sampled_row] == seq.request_id
    if overrides.get("num_gpu_blocks") == 14 and "num_host_blocks" not in overrides:
        assert core.planner.num_preemptions > 0


def test_a_request_finished_by_the_step_ahead_costs_one_row_and_frees_its_blocks() -> None:
    # EOS at step N is known only after N+1 was submitted behind it: N+1 runs that row anyway
    # (its KV lands in blocks freed meanwhile), and nothing reads it.
    reqs = [(p, 30) for p in prompts(6)]
    eos = [FakeExecutor.reference(reqs[0][0], 30, VOCAB)[5]]
    core, executor = make_core(config(), eos)
    for i, (prompt, max_tokens) in enumerate(reqs):
        core.add_request(Request(f"r{i}", prompt, max_tokens, sampling_params=greedy(max_tokens)))
    tokens = drain_tokens(core)
    for i, (prompt, _) in enumerate(reqs):
        assert tokens[f"r{i}"] == FakeExecutor.reference(prompt, 30, VOCAB, eos)
    assert tokens["r0"][-1] == eos[0] and len(tokens["r0"]) == 6
    rows = sum(1 for p in executor.plans for s in p.sequences if s.request_id == "r0")
    assert rows == 2 + 6 - 1  # prompt step, the 5 decodes that follow it, one wasted row
    assert core.kv_cache.stats().num_used_blocks == 0
    # Later requests reuse the freed blocks and still read back what they wrote.
    late = prompts(9)[6:]
    for i, prompt in enumerate(late):
        core.add_request(Request(f"late{i}", prompt, 20, sampling_params=greedy(20)))
    again = drain_tokens(core)
    for i, prompt in enumerate(late):
        assert again[f"late{i}"] == FakeExecutor.reference(prompt, 20, VOCAB, eos)


def test_rows_whose_sampling_reads_their_output_are_never_chained() -> None:
    core, executor = make_core(config())
    plain, penalized, min_tokens = prompts(3)
    core.add_request(Request("plain", plain, 16, sampling_params=greedy(16)))
    core.add_request(Request("pen", penalized, 6, sampling_params=greedy(6, presence_penalty=0.5)))
    core.add_request(Request("min", min_tokens, 10, sampling_params=greedy(10, min_tokens=4)))
    drain_tokens(core)
    chained = [p for _, p in chained_pairs(executor)]
    assert chained, "plain decodes alone should chain once the others are done"
    for plan in chained:
        ids = {s.request_id for s in plan.sequences}
        assert "pen" not in ids
        # min_tokens=4: its first 4 output tokens are sampled with EOS masked, by length.
        for seq in plan.sequences:
            if seq.request_id == "min":
                assert seq.start_pos >= len(min_tokens) + 4


def test_seeded_sampling_is_the_same_with_and_without_chaining() -> None:
    outputs = []
    for chain_steps in (True, False):
        core, executor = make_core(config(chain_steps=chain_steps))
        for i, prompt in enumerate(prompts(5)):
            params = SamplingParams(temperature=5.0, seed=100 + i, max_tokens=24)
            core.add_request(Request(f"s{i}", prompt, 24, sampling_params=params))
        outputs.append(drain_tokens(core))
        assert bool(chained_pairs(executor)) is chain_steps
    chained, unchained = outputs
    assert chained == unchained
    # Temperature 5 over the fake's logits leaves the greedy token unlikely: it did sample.
    greedy_tokens = {
        f"s{i}": FakeExecutor.reference(p, 24, VOCAB) for i, p in enumerate(prompts(5))
    }
    assert chained != greedy_tokens


def test_blocks_written_by_chained_steps_become_prefix_hits() -> None:
    # The decode blocks of a chained step are registered once the step ahead is sampled.
    core, executor = make_core(config())
    prompt = prompts(1)[0][:6]
    core.add_request(Request("first", prompt, 20, sampling_params=greedy(20)))
    first = drain_tokens(core)["first"]
    assert chained_pairs(executor)
    follow_up = [*prompt, *first, 3]
    core.add_request(Request("second", follow_up, 4, sampling_params=greedy(4)))
    outputs = core.drain()
    assert [t for o in outputs for t in o.new_token_ids] == FakeExecutor.reference(
        follow_up, 4, VOCAB
    )
    # Every full block of prompt + the generated tokens whose KV was computed (the last one's
    # never was) is a hit.
    computed = len(prompt) + len(first) - 1
    assert outputs[-1].num_cached_tokens == computed // BS * BS


async def test_aborts_while_steps_are_chained_leave_the_others_exact() -> None:
    cfg = config()
    executor = SamplingFakeExecutor(cfg.num_gpu_blocks or 0, cfg.block_size, VOCAB)
    engine = AsyncEngine(cfg, executor)
    try:
        reqs = prompts(6)

        async def run(i: int, prompt: list[int]) -> list[int]:
            out: list[int] = []
            async for o in engine.generate(f"r{i}", prompt, greedy(40)):
                out.extend(o.new_token_ids)
                if i % 2 and len(out) >= 5:
                    engine.abort(f"r{i}")
            return out

        results = await asyncio.gather(*(run(i, p) for i, p in enumerate(reqs)))
        for i, prompt in enumerate(reqs):
            reference = FakeExecutor.reference(prompt, 40, VOCAB)
            if i % 2:
                assert results[i] == reference[: len(results[i])]
            else:
                assert results[i] == reference
        deadline = asyncio.get_running_loop().time() + 20
        while engine.stats().kv_blocks_used or engine.stats().num_running:
            assert asyncio.get_running_loop().time() < deadline, "blocks still held"
            await asyncio.sleep(0.005)
        assert chained_pairs(executor)
    finally:
        engine.shutdown()


def _plan(step_id: int, fed_by: int | None, rows: Sequence[int]) -> StepPlan:
    return StepPlan(
        step_id=step_id,
        sequences=[
            StepSequence(f"q{i}", [-1], start_pos=3, block_table=[0], sampled_row=row)
            for i, row in enumerate(rows)
        ],
        fed_by_step=fed_by,
    )


def test_the_chain_feeds_the_named_rows_and_only_from_the_step_just_sampled() -> None:
    chain = StepChain()
    logits = torch.zeros(3, 5)

    def sample(tokens: list[int]):  # type: ignore[no-untyped-def]
        return lambda _: (tokens, f"kept {tokens}")

    assert chain.run(lambda p: logits, _plan(1, None, []), sample([4, 2, 9])) == "kept [4, 2, 9]"
    fed = _plan(2, 1, [2, 0])
    chain.run(lambda p: logits, fed, sample([1, 1, 1]))
    assert [s.token_ids for s in fed.sequences] == [[9], [4]]
    with pytest.raises(FailedPrecondition, match="fed by step 1"):
        chain.feed(_plan(3, 1, [0]))  # step 2 was sampled last

    def broken(plan: StepPlan) -> torch.Tensor:
        raise RuntimeError("device lost")

    with pytest.raises(RuntimeError):
        chain.run(broken, _plan(3, 2, [0]), sample([0, 0, 0]))
    with pytest.raises(FailedPrecondition, match="last sampled step was None"):
        chain.feed(_plan(4, 3, [0]))
    with pytest.raises(RuntimeError, match="2 tokens for 3 rows"):
        chain.run(lambda p: logits, _plan(5, None, []), sample([0, 0]))


def test_an_unsampled_submission_refuses_a_chained_plan() -> None:
    refuse_chained(_plan(1, None, []))
    with pytest.raises(FailedPrecondition, match="chained behind step 1"):
        refuse_chained(_plan(2, 1, [0]))
    with pytest.raises(FailedPrecondition):
        FakeExecutor(4, BS, VOCAB).submit(_plan(2, 1, [0]))
