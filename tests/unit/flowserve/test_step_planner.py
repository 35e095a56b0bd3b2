"""StepPlanner: chunked prefill, decode priority, prefix reuse, preemption, rejection, placeholders."""

from __future__ import annotations

import pytest

from deepserve.errors import FailedPrecondition, InvalidArgument
from deepserve.flowserve.engine.request import PLACEHOLDER_TOKEN_ID, Request, RequestStatus
from deepserve.flowserve.engine.step_plan import StepPlan
from deepserve.flowserve.engine.step_planner import StepPlanner, StepPlannerConfig
from deepserve.flowserve.kv_cache import KVCacheManager
from deepserve.flowserve.testing.fake_executor import FakeExecutor
from deepserve.sampling_params import SamplingParams

BS = 4
VOCAB = 97


def make(num_blocks: int = 64, max_num_seqs: int = 8, budget: int = 64, **kv_kwargs: object):
    kv = KVCacheManager(num_blocks, BS, **kv_kwargs)
    planner = StepPlanner(StepPlannerConfig(max_num_seqs, budget), kv)
    return planner, FakeExecutor(num_blocks, BS, VOCAB)


def req(
    rid: str,
    prompt: list[int],
    max_tokens: int = 6,
    *,
    eos_token_ids: frozenset[int] = frozenset(),
    **params: object,
) -> Request:
    sampling = SamplingParams(max_tokens=max_tokens, **params)  # type: ignore[arg-type]
    return Request(rid, list(prompt), max_tokens, sampling, eos_token_ids=eos_token_ids)


def step(planner: StepPlanner, executor: FakeExecutor) -> StepPlan:
    plan = planner.finalize_plan(planner.plan_step())
    planner.kv_cache.flush_transfers()
    assert plan.num_tokens <= planner.config.step_token_budget + planner.config.finish_slack
    assert len(plan.sequences) <= planner.config.max_num_seqs
    if not plan.is_empty:
        logits = executor.execute(plan)
        rows = [s.request_id for s in plan.sequences if s.needs_logits]
        planner.update_from_output(dict(zip(rows, logits.argmax(-1).tolist(), strict=True)))
    return plan


def run(planner: StepPlanner, executor: FakeExecutor, max_steps: int = 2000) -> list[StepPlan]:
    plans = []
    while planner.has_unfinished_requests:
        plans.append(step(planner, executor))
        assert len(plans) < max_steps, "the planner made no progress"
    return plans


def prompts(n: int, base: int = 1) -> list[list[int]]:
    return [
        [(base * 7 + i * 13 + j * 5) % VOCAB for j in range(3 + (i * 5) % 17)] for i in range(n)
    ]


def test_chunked_prefill_respects_token_budget() -> None:
    planner, executor = make(budget=16)
    r = req("long", list(range(50)), max_tokens=3)
    planner.add_request(r)
    plans = run(planner, executor)
    chunks = [b.sequences[0] for b in plans]
    assert [len(c.token_ids) for c in chunks[:4]] == [16, 16, 16, 2]
    assert [c.start_pos for c in chunks[:4]] == [0, 16, 32, 48]
    assert [c.needs_logits for c in chunks[:4]] == [False, False, False, True]
    assert r.output_token_ids == FakeExecutor.reference(list(range(50)), 3, VOCAB)
    assert r.finish_reason == "length"
    assert planner.kv_cache.stats().num_used_blocks == 0


def test_decodes_are_never_starved_by_a_long_prompt() -> None:
    planner, executor = make(budget=8)
    short = req("short", [1, 2, 3], max_tokens=20)
    planner.add_request(short)
    step(planner, executor)  # short's prefill
    long = req("long", list(range(60)), max_tokens=2)
    planner.add_request(long)
    while not short.is_finished:
        plan = step(planner, executor)
        ids = [s.request_id for s in plan.sequences]
        assert ids[0] == "short" and len(plan.sequences[0].token_ids) == 1
    run(planner, executor)
    assert short.output_token_ids == FakeExecutor.reference([1, 2, 3], 20, VOCAB)
    assert long.output_token_ids == FakeExecutor.reference(list(range(60)), 2, VOCAB)


def test_max_num_seqs_caps_running_requests() -> None:
    planner, executor = make(max_num_seqs=2)
    reqs = [req(f"r{i}", p) for i, p in enumerate(prompts(5))]
    for r in reqs:
        planner.add_request(r)
    step(planner, executor)
    assert planner.num_running == 2 and planner.num_waiting == 3
    run(planner, executor)
    for r in reqs:
        assert r.output_token_ids == FakeExecutor.reference(r.prompt_token_ids, 6, VOCAB)


def test_prefix_hit_skips_cached_tokens_but_computes_the_last() -> None:
    planner, executor = make()
    prompt = list(range(10, 22))  # 3 full blocks
    first = req("a", prompt)
    planner.add_request(first)
    run(planner, executor)
    second = req("b", prompt)
    planner.add_request(second)
    plan = step(planner, executor)
    (seq,) = plan.sequences
    # The whole prompt is cached, but the last token must run for logits: one block is redone.
    assert seq.start_pos == 8 and seq.token_ids == prompt[8:]
    assert second.num_cached_tokens == 8
    run(planner, executor)
    assert second.output_token_ids == first.output_token_ids


def test_preemption_with_tiny_cache_finishes_everything_identically() -> None:
    reqs_big = [req(f"r{i}", p, max_tokens=12) for i, p in enumerate(prompts(8))]
    sched_big, ex_big = make(num_blocks=256)
    for r in reqs_big:
        sched_big.add_request(r)
    run(sched_big, ex_big)
    assert sched_big.num_preemptions == 0

    reqs_small = [req(f"r{i}", p, max_tokens=12) for i, p in enumerate(prompts(8))]
    planner, executor = make(num_blocks=10, budget=12)
    for r in reqs_small:
        planner.add_request(r)
    run(planner, executor)
    assert planner.num_preemptions > 0
    for small, big in zip(reqs_small, reqs_big, strict=True):
        assert small.output_token_ids == big.output_token_ids
        assert small.output_token_ids == FakeExecutor.reference(small.prompt_token_ids, 12, VOCAB)
        assert small.finish_reason == "length"
    assert planner.kv_cache.stats().num_used_blocks == 0


def test_preempted_request_resumes_with_generated_tokens_as_prompt() -> None:
    planner, executor = make(num_blocks=4, budget=64)
    old = req("old", [1, 2, 3, 4, 5, 6], max_tokens=8)  # needs 14 tokens: 4 blocks at the end
    young = req("young", [9, 8, 7], max_tokens=6)
    planner.add_request(old)
    planner.add_request(young)
    run(planner, executor)
    # The latest arrival is the one preempted.
    assert young.num_preemptions > 0 and old.num_preemptions == 0
    assert old.output_token_ids == FakeExecutor.reference(old.prompt_token_ids, 8, VOCAB)
    assert young.output_token_ids == FakeExecutor.reference(young.prompt_token_ids, 6, VOCAB)


def test_request_larger_than_the_cache_is_rejected() -> None:
    planner, _ = make(num_blocks=4)  # 16 token slots
    with pytest.raises(InvalidArgument) as exc:
        planner.add_request(req("a", list(range(10)), max_tokens=7))
    assert exc.value.field == "max_tokens"
    with pytest.raises(InvalidArgument) as exc:
        planner.add_request(req("b", list(range(17)), max_tokens=1))
    assert exc.value.field == "prompt_token_ids"
    assert not planner.has_unfinished_requests


def test_request_that_cannot_grow_fails_instead_of_looping() -> None:
    planner, executor = make(num_blocks=4)
    # Pin two blocks so only 8 of the 16 slots are usable.
    planner.kv_cache.alloc(req("pinned", list(range(8))), 8)
    planner.kv_cache.cache_blocks(req("pinned", list(range(8))), 8)
    planner.kv_cache.free("pinned")
    assert planner.kv_cache.pin("ctx", list(range(8))) == 8
    r = req("a", [50, 51, 52, 53, 54, 55], max_tokens=8)
    planner.add_request(r)
    run(planner, executor, max_steps=50)
    assert r.finish_reason == "error" and r.error
    assert planner.take_failed() == [r]
    assert planner.kv_cache.stats().num_used_blocks == 2  # only the pin


def test_stop_token_eos_and_min_tokens() -> None:
    planner, executor = make()
    ref = FakeExecutor.reference([3, 1, 4], 10, VOCAB)
    eos = req("eos", [3, 1, 4], max_tokens=10, eos_token_ids=frozenset({ref[2]}))
    stop = req("stop", [3, 1, 4], max_tokens=10, stop_token_ids=[ref[1]])
    late = req("late", [3, 1, 4], max_tokens=10, stop_token_ids=[ref[1]], min_tokens=2)
    ignore = req("ign", [3, 1, 4], max_tokens=4, eos_token_ids=frozenset({ref[0]}), ignore_eos=True)
    for r in (eos, stop, late, ignore):
        planner.add_request(r)
    run(planner, executor)
    assert (eos.output_token_ids, eos.finish_reason, eos.stop_reason) == (ref[:3], "stop", None)
    assert (stop.output_token_ids, stop.stop_reason) == (ref[:2], ref[1])
    assert late.finish_reason in ("stop", "length") and len(late.output_token_ids) > 2
    assert (ignore.output_token_ids, ignore.finish_reason) == (ref[:4], "length")


def test_abort_frees_blocks_from_any_queue() -> None:
    planner, executor = make(max_num_seqs=1)
    a, b = req("a", list(range(9)), max_tokens=50), req("b", [1, 2, 3])
    planner.add_request(a)
    planner.add_request(b)
    step(planner, executor)
    assert planner.kv_cache.stats().num_used_blocks == 3
    assert planner.finish_request("b", RequestStatus.FINISHED_ABORTED) is b
    assert planner.finish_request("a", RequestStatus.FINISHED_ABORTED) is a
    assert planner.finish_request("a", RequestStatus.FINISHED_ABORTED) is None
    assert a.finish_reason == b.finish_reason == "abort"
    assert planner.kv_cache.stats().num_used_blocks == 0 and not planner.has_unfinished_requests
    assert planner.plan_step().is_empty


def test_next_step_is_scheduled_before_the_sampled_token_is_known() -> None:
    planner, executor = make()
    a, b = req("a", [1, 2, 3], max_tokens=5), req("b", [4, 5, 6, 7, 8], max_tokens=5)
    planner.add_request(a)
    planner.add_request(b)
    first = planner.finalize_plan(planner.plan_step())
    logits = executor.execute(first)
    # Step 2 scheduled while step 1 "runs": each decode gets a placeholder.
    second = planner.plan_step()
    assert [s.token_ids for s in second.sequences] == [[PLACEHOLDER_TOKEN_ID]] * 2
    assert [s.start_pos for s in second.sequences] == [3, 5]
    with pytest.raises(RuntimeError, match="not sampled yet"):
        planner.finalize_plan(StepPlan(0, [s for s in second.sequences]))
    tokens = logits.argmax(-1).tolist()
    planner.update_from_output({"a": tokens[0], "b": tokens[1]})
    planner.finish_request("b", RequestStatus.FINISHED_ABORTED)  # b ends before step 2 is sent
    second = planner.finalize_plan(second)
    assert [(s.request_id, s.token_ids) for s in second.sequences] == [("a", [tokens[0]])]
    planner.update_from_output({"a": int(executor.execute(second).argmax(-1)[0])})
    run(planner, executor)
    assert a.output_token_ids == FakeExecutor.reference([1, 2, 3], 5, VOCAB)
    assert planner.kv_cache.stats().num_used_blocks == 0


def test_no_wasted_slot_when_the_token_in_flight_reaches_max_tokens() -> None:
    planner, _ = make()
    a = req("a", [1, 2, 3], max_tokens=1)
    planner.add_request(a)
    planner.finalize_plan(planner.plan_step())
    assert planner.plan_step().is_empty  # a's only token is in flight: nothing to compute


@pytest.mark.parametrize("stop", [{"eos_token_ids": frozenset({7})}, {"stop_token_ids": [7]}])
def test_min_tokens_come_before_a_stop_token_can_end_the_request(stop: dict) -> None:
    # min_tokens=2: the first two output tokens cannot end it, the third can.
    planner, _ = make()
    r = req("m", [1, 2, 3], max_tokens=10, min_tokens=2, **stop)
    planner.add_request(r)
    planner.update_from_output({"m": 7})
    planner.update_from_output({"m": 7})  # output token 2 == min_tokens: not yet
    assert not r.is_finished
    planner.update_from_output({"m": 7})
    assert (r.output_token_ids, r.finish_reason) == ([7, 7, 7], "stop")
    assert r.stop_reason == (7 if "stop_token_ids" in stop else None)
    assert planner.kv_cache.stats().num_used_blocks == 0


def test_remote_kv_reservation_waits_outside_the_queues_then_decodes() -> None:
    planner, executor = make(num_blocks=16)
    prompt = list(range(10, 20))
    r = req("d", prompt, max_tokens=4)
    match = planner.reserve_remote_kv(r)
    assert match is not None and match.num_tokens == 0
    assert r.status is RequestStatus.WAITING_FOR_REMOTE_KV
    assert planner.num_waiting_for_remote_kv == 1 and not planner.has_unfinished_requests
    assert planner.plan_step().is_empty  # nothing to compute until the KV is there
    with pytest.raises(FailedPrecondition):
        planner.reserve_remote_kv(req("d", [1]))
    with pytest.raises(InvalidArgument):
        planner.add_request(req("d", [1]))
    # The prefill instance's KV lands in the reserved blocks (the fake KV is the token ids).
    table = planner.kv_cache.block_ids("d")
    for pos, token_id in enumerate(prompt):
        executor.kv[table[pos // BS]][pos % BS] = token_id
    reference = FakeExecutor.reference(prompt, 4, VOCAB)
    assert planner.activate_remote_kv("d", reference[0], num_cached_tokens=3) is r
    assert r.status is RequestStatus.RUNNING and r.num_computed_tokens == len(prompt)
    assert planner.num_waiting_for_remote_kv == 0
    run(planner, executor)
    assert r.output_token_ids == reference and r.num_cached_tokens == 3
    assert planner.activate_remote_kv("d", 1) is None  # not waiting any more


def test_aborting_a_remote_kv_reservation_frees_its_blocks() -> None:
    planner, _ = make(num_blocks=16)
    r = req("d", list(range(10)), max_tokens=4)
    assert planner.reserve_remote_kv(r) is not None
    assert planner.kv_cache.stats().num_used_blocks == 3
    assert planner.finish_request("d", RequestStatus.FINISHED_ABORTED) is r
    assert r.finish_reason == "abort" and planner.kv_cache.stats().num_used_blocks == 0
    assert planner.activate_remote_kv("d", 1) is None


def test_finished_hold_kv_request_keeps_its_blocks_until_released() -> None:
    planner, executor = make()
    r = req("p", list(range(9)), max_tokens=1)
    r.hold_kv = True
    aborted = req("q", list(range(9)), max_tokens=5)
    aborted.hold_kv = True
    planner.add_request(r)
    planner.add_request(aborted)
    step(planner, executor)
    planner.finish_request("q", RequestStatus.FINISHED_ABORTED)  # aborts never hold KV
    run(planner, executor)
    assert r.status is RequestStatus.FINISHED_HOLDING_KV and r.is_finished
    assert r.finish_reason == "length"
    assert planner.holds_kv("p") and not planner.holds_kv("q")
    assert planner.num_holding_kv == 1 and not planner.has_unfinished_requests
    assert planner.kv_cache.stats().num_used_blocks == 3
    with pytest.raises(InvalidArgument):
        planner.add_request(req("p", [1]))  # the id is still taken by the held blocks
    assert planner.release_kv("p") and not planner.release_kv("p")
    assert planner.kv_cache.stats().num_used_blocks == 0


def test_finish_all_ends_reservations_and_live_requests_and_frees_held_kv() -> None:
    planner, executor = make(num_blocks=32)
    held = req("held", list(range(5)), max_tokens=1)
    held.hold_kv = True
    planner.add_request(held)
    run(planner, executor)
    remote, live = req("remote", list(range(6))), req("live", list(range(7)))
    assert planner.reserve_remote_kv(remote) is not None
    planner.add_request(live)
    step(planner, executor)
    finished = planner.finish_all(RequestStatus.FINISHED_ERROR)
    assert finished == [remote, live]
    assert remote.finish_reason == live.finish_reason == "error"
    assert planner.num_holding_kv == planner.num_waiting_for_remote_kv == 0
    assert planner.kv_cache.stats().num_used_blocks == 0 and not planner.has_unfinished_requests


def test_requests_admitted_in_one_step_share_the_prefix_it_computes() -> None:
    """A burst sharing a system prompt: the first computes the shared blocks, the others of
    the same step start after them (each layer writes the step's KV before attending)."""
    planner, executor = make(budget=64)
    shared = [(5 + 3 * j) % VOCAB for j in range(3 * BS)]  # three full blocks
    requests = [req(f"s{i}", [*shared, 40 + i, 50 + i], max_tokens=3) for i in range(3)]
    for r in requests:
        planner.add_request(r)
    plans = run(planner, executor)
    first = {s.request_id: s for s in plans[0].sequences}
    assert set(first) == {"s0", "s1", "s2"}
    assert first["s0"].start_pos == 0
    assert first["s1"].start_pos == first["s2"].start_pos == 3 * BS
    assert plans[0].num_tokens == len(shared) + 2 + 2 + 2  # the shared blocks once
    for r in requests:
        assert r.output_token_ids == FakeExecutor.reference(r.prompt_token_ids, 3, VOCAB)
        assert r.num_cached_tokens == (0 if r.request_id == "s0" else 3 * BS)


def test_the_waiting_tokens_to_compute_count_a_shared_or_cached_prefix_once() -> None:
    """What the burst admission window weighs: the tokens one step would really compute."""
    planner, executor = make(budget=64)
    shared = [(5 + 3 * j) % VOCAB for j in range(3 * BS)]  # three full blocks
    for i in range(3):
        planner.add_request(req(f"s{i}", [*shared, 40 + i, 50 + i], max_tokens=3))
    assert planner.waiting_tokens_to_compute() == len(shared) + 3 * 2
    salted = req("salted", [*shared, 1])
    salted.cache_salt = "tenant-b"  # its blocks hash apart: shares nothing
    planner.add_request(salted)
    assert planner.waiting_tokens_to_compute() == len(shared) + 3 * 2 + len(shared) + 1
    run(planner, executor)
    # The shared blocks are cached now: a new request computes only what follows them.
    planner.add_request(req("later", [*shared, 60, 61, 62]))
    assert planner.waiting_tokens_to_compute() == 3
    # A prompt of whole blocks still computes its last block (the last token's logits).
    planner.add_request(req("exact", shared[: 2 * BS]))
    assert planner.waiting_tokens_to_compute() == 3 + BS


def test_a_step_runs_over_its_budget_by_the_slack_to_finish_a_prompt_whole() -> None:
    planner, executor = make(budget=64)  # slack: 2 tokens
    assert planner.config.finish_slack == 2
    for i in range(2):
        planner.add_request(req(f"old{i}", [(3 + i * 7 + j) % VOCAB for j in range(16)]))
    step(planner, executor)  # both prefill; they decode from now on
    for i in range(4):
        planner.add_request(req(f"new{i}", [(11 + i * 5 + j) % VOCAB for j in range(16)]))
    plan = step(planner, executor)
    # 2 decodes leave 62 tokens: three prompts whole, and the fourth needs 16 where 14 are
    # left; it finishes in this step rather than wait one more for its last 2 tokens.
    chunks = {s.request_id: len(s.token_ids) for s in plan.sequences}
    assert chunks == {"old0": 1, "old1": 1, "new0": 16, "new1": 16, "new2": 16, "new3": 16}
    assert plan.num_tokens == 66
    # Beyond the slack a prompt is still cut at the budget.
    planner.add_request(req("long", [(5 + j) % VOCAB for j in range(80)]))
    run(planner, executor)


def test_a_salted_request_does_not_share_blocks_computed_in_the_same_step() -> None:
    planner, executor = make(budget=64)
    shared = [(5 + 3 * j) % VOCAB for j in range(2 * BS)]
    planner.add_request(req("plain", [*shared, 1]))
    salted = req("salted", [*shared, 2])
    salted.cache_salt = "tenant-b"
    planner.add_request(salted)
    plans = run(planner, executor)
    assert {s.request_id: s.start_pos for s in plans[0].sequences} == {"plain": 0, "salted": 0}


def test_a_prompt_that_fits_only_in_part_lets_whole_prompts_behind_it_go_first() -> None:
    planner, executor = make(budget=20)
    planner.add_request(req("a", list(range(1, 11))))  # 10 tokens: fits
    planner.add_request(req("big", list(range(20, 50))))  # 30: only in part
    planner.add_request(req("c", list(range(60, 65))))  # 5: fits whole behind it
    first = step(planner, executor)
    assert [(s.request_id, len(s.token_ids)) for s in first.sequences] == [
        ("a", 10),
        ("c", 5),
        ("big", 5),  # the budget left: it still advances this step
    ]
    second = step(planner, executor)
    assert ("big", 18) in [(s.request_id, len(s.token_ids)) for s in second.sequences]


def test_no_lower_priority_prompt_goes_ahead_of_a_deferred_one() -> None:
    planner, executor = make(budget=20)
    big, low = req("big", list(range(20, 50))), req("low", list(range(60, 65)))
    big.priority = 5
    planner.add_request(big)
    planner.add_request(low)
    first = step(planner, executor)
    assert [(s.request_id, len(s.token_ids)) for s in first.sequences] == [("big", 20)]


def test_outputs_do_not_change_when_prompts_go_ahead() -> None:
    planner, executor = make(budget=24)
    sizes = [10, 30, 5, 40, 3, 12]
    requests = [req(f"r{i}", [(i * 17 + j) % VOCAB for j in range(n)]) for i, n in enumerate(sizes)]
    for r in requests:
        planner.add_request(r)
    run(planner, executor)
    for r in requests:
        assert r.output_token_ids == FakeExecutor.reference(r.prompt_token_ids, 6, VOCAB)


def test_top_up_admits_requests_that_arrived_after_the_plan() -> None:
    planner, executor = make(budget=16)
    early = req("early", [1, 2, 3, 4, 5])
    planner.add_request(early)
    plan = planner.plan_step()
    assert [s.request_id for s in plan.sequences] == ["early"]
    # Arrivals while the previous step ran: one fits the budget left whole (11 tokens), the
    # next only in part.
    late, later = req("late", list(range(10, 16))), req("later", list(range(20, 29)))
    planner.add_request(late)
    planner.add_request(later)
    plan = planner.finalize_plan(plan)
    assert planner.top_up(plan)
    assert [(s.request_id, len(s.token_ids)) for s in plan.sequences] == [
        ("early", 5),
        ("late", 6),
        ("later", 5),
    ]
    assert planner.num_waiting == 0
    logits = executor.execute(plan)
    rows = [s.request_id for s in plan.sequences if s.needs_logits]
    planner.update_from_output(dict(zip(rows, logits.argmax(-1).tolist(), strict=True)))
    run(planner, executor)
    for request in (early, late, later):
        assert request.output_token_ids == FakeExecutor.reference(
            request.prompt_token_ids, 6, VOCAB
        )
    assert planner.kv_cache.stats().num_used_blocks == 0


def test_top_up_adds_nothing_to_a_full_plan_or_one_that_preempted() -> None:
    planner, _ = make(budget=8)
    planner.add_request(req("a", list(range(1, 9))))
    plan = planner.finalize_plan(planner.plan_step())
    planner.add_request(req("b", [1, 2]))
    assert not planner.top_up(plan)  # the budget is spent
    assert [s.request_id for s in plan.sequences] == ["a"]

    planner, executor = make(num_blocks=3, budget=12)
    planner.add_request(req("x", list(range(1, 5)), max_tokens=8))
    planner.add_request(req("y", list(range(5, 9)), max_tokens=8))
    step(planner, executor)
    # Both now need a block for their next token and one is free: y is preempted, and the
    # block it frees would hold z, but a plan that preempted takes no one more.
    plan = planner.finalize_plan(planner.plan_step())
    assert planner.num_preemptions == 1
    assert planner.kv_cache.stats().num_used_blocks == 2
    urgent = req("z", [3])
    urgent.priority = 1  # first in line, ahead of the preempted y
    planner.add_request(urgent)
    assert not planner.top_up(plan)
    assert [s.request_id for s in plan.sequences] == ["x"]
