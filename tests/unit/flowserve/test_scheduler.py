"""Scheduler: chunked prefill, decode priority, prefix reuse, preemption, rejection, placeholders."""

from __future__ import annotations

import pytest

from deepserve.errors import InvalidArgument
from deepserve.flowserve.engine.request import PLACEHOLDER_TOKEN_ID, Request, RequestStatus
from deepserve.flowserve.engine.step_plan import ScheduledBatch
from deepserve.flowserve.engine.step_planner import Scheduler, SchedulerConfig
from deepserve.flowserve.kv_cache import KVCacheManager
from deepserve.flowserve.testing.fake_executor import FakeExecutor

BS = 4
VOCAB = 97


def make(num_blocks: int = 64, max_num_seqs: int = 8, budget: int = 64, **kv_kwargs: object):
    kv = KVCacheManager(num_blocks, BS, **kv_kwargs)
    return Scheduler(SchedulerConfig(max_num_seqs, budget), kv), FakeExecutor(num_blocks, BS, VOCAB)


def req(rid: str, prompt: list[int], max_tokens: int = 6, **kwargs: object) -> Request:
    return Request(rid, list(prompt), max_tokens, **kwargs)


def step(sched: Scheduler, executor: FakeExecutor) -> ScheduledBatch:
    batch = sched.finalize_batch(sched.schedule())
    sched.kv_cache.flush_transfers()
    assert batch.num_tokens <= sched.config.max_num_batched_tokens
    assert len(batch.sequences) <= sched.config.max_num_seqs
    if not batch.is_empty:
        logits = executor.execute(batch)
        rows = [s.request_id for s in batch.sequences if s.needs_logits]
        sched.update_from_output(dict(zip(rows, logits.argmax(-1).tolist(), strict=True)))
    return batch


def run(sched: Scheduler, executor: FakeExecutor, max_steps: int = 2000) -> list[ScheduledBatch]:
    batches = []
    while sched.has_unfinished_requests:
        batches.append(step(sched, executor))
        assert len(batches) < max_steps, "scheduler made no progress"
    return batches


def prompts(n: int, base: int = 1) -> list[list[int]]:
    return [
        [(base * 7 + i * 13 + j * 5) % VOCAB for j in range(3 + (i * 5) % 17)] for i in range(n)
    ]


def test_chunked_prefill_respects_token_budget() -> None:
    sched, executor = make(budget=16)
    r = req("long", list(range(50)), max_tokens=3)
    sched.add_request(r)
    batches = run(sched, executor)
    chunks = [b.sequences[0] for b in batches]
    assert [len(c.token_ids) for c in chunks[:4]] == [16, 16, 16, 2]
    assert [c.start_pos for c in chunks[:4]] == [0, 16, 32, 48]
    assert [c.needs_logits for c in chunks[:4]] == [False, False, False, True]
    assert r.output_token_ids == FakeExecutor.reference(list(range(50)), 3, VOCAB)
    assert r.finish_reason == "length"
    assert sched.kv_cache.stats().num_used_blocks == 0


def test_decodes_are_never_starved_by_a_long_prompt() -> None:
    sched, executor = make(budget=8)
    short = req("short", [1, 2, 3], max_tokens=20)
    sched.add_request(short)
    step(sched, executor)  # short's prefill
    long = req("long", list(range(60)), max_tokens=2)
    sched.add_request(long)
    while not short.is_finished:
        batch = step(sched, executor)
        ids = [s.request_id for s in batch.sequences]
        assert ids[0] == "short" and len(batch.sequences[0].token_ids) == 1
    run(sched, executor)
    assert short.output_token_ids == FakeExecutor.reference([1, 2, 3], 20, VOCAB)
    assert long.output_token_ids == FakeExecutor.reference(list(range(60)), 2, VOCAB)


def test_max_num_seqs_caps_running_requests() -> None:
    sched, executor = make(max_num_seqs=2)
    reqs = [req(f"r{i}", p) for i, p in enumerate(prompts(5))]
    for r in reqs:
        sched.add_request(r)
    step(sched, executor)
    assert sched.num_running == 2 and sched.num_waiting == 3
    run(sched, executor)
    for r in reqs:
        assert r.output_token_ids == FakeExecutor.reference(r.prompt_token_ids, 6, VOCAB)


def test_prefix_hit_skips_cached_tokens_but_computes_the_last() -> None:
    sched, executor = make()
    prompt = list(range(10, 22))  # 3 full blocks
    first = req("a", prompt)
    sched.add_request(first)
    run(sched, executor)
    second = req("b", prompt)
    sched.add_request(second)
    batch = step(sched, executor)
    (seq,) = batch.sequences
    # The whole prompt is cached, but the last token must run for logits: one block is redone.
    assert seq.start_pos == 8 and seq.token_ids == prompt[8:]
    assert second.num_cached_tokens == 8
    run(sched, executor)
    assert second.output_token_ids == first.output_token_ids


def test_preemption_with_tiny_cache_finishes_everything_identically() -> None:
    reqs_big = [req(f"r{i}", p, max_tokens=12) for i, p in enumerate(prompts(8))]
    sched_big, ex_big = make(num_blocks=256)
    for r in reqs_big:
        sched_big.add_request(r)
    run(sched_big, ex_big)
    assert sched_big.num_preemptions == 0

    reqs_small = [req(f"r{i}", p, max_tokens=12) for i, p in enumerate(prompts(8))]
    sched, executor = make(num_blocks=10, budget=12)
    for r in reqs_small:
        sched.add_request(r)
    run(sched, executor)
    assert sched.num_preemptions > 0
    for small, big in zip(reqs_small, reqs_big, strict=True):
        assert small.output_token_ids == big.output_token_ids
        assert small.output_token_ids == FakeExecutor.reference(small.prompt_token_ids, 12, VOCAB)
        assert small.finish_reason == "length"
    assert sched.kv_cache.stats().num_used_blocks == 0


def test_preempted_request_resumes_with_generated_tokens_as_prompt() -> None:
    sched, executor = make(num_blocks=4, budget=64)
    old = req("old", [1, 2, 3, 4, 5, 6], max_tokens=8)  # needs 14 tokens: 4 blocks at the end
    young = req("young", [9, 8, 7], max_tokens=6)
    sched.add_request(old)
    sched.add_request(young)
    run(sched, executor)
    # The latest arrival is the one preempted.
    assert young.num_preemptions > 0 and old.num_preemptions == 0
    assert old.output_token_ids == FakeExecutor.reference(old.prompt_token_ids, 8, VOCAB)
    assert young.output_token_ids == FakeExecutor.reference(young.prompt_token_ids, 6, VOCAB)


def test_request_larger_than_the_cache_is_rejected() -> None:
    sched, _ = make(num_blocks=4)  # 16 token slots
    with pytest.raises(InvalidArgument) as exc:
        sched.add_request(req("a", list(range(10)), max_tokens=7))
    assert exc.value.field == "max_tokens"
    with pytest.raises(InvalidArgument) as exc:
        sched.add_request(req("b", list(range(17)), max_tokens=1))
    assert exc.value.field == "prompt_token_ids"
    assert not sched.has_unfinished_requests


def test_request_that_cannot_grow_fails_instead_of_looping() -> None:
    sched, executor = make(num_blocks=4)
    # Pin two blocks so only 8 of the 16 slots are usable.
    sched.kv_cache.alloc(req("pinned", list(range(8))), 8)
    sched.kv_cache.cache_blocks(req("pinned", list(range(8))), 8)
    sched.kv_cache.free("pinned")
    assert sched.kv_cache.pin("ctx", list(range(8))) == 8
    r = req("a", [50, 51, 52, 53, 54, 55], max_tokens=8)
    sched.add_request(r)
    run(sched, executor, max_steps=50)
    assert r.finish_reason == "error" and r.error
    assert sched.take_failed() == [r]
    assert sched.kv_cache.stats().num_used_blocks == 2  # only the pin


def test_stop_token_eos_and_min_tokens() -> None:
    sched, executor = make()
    ref = FakeExecutor.reference([3, 1, 4], 10, VOCAB)
    eos = req("eos", [3, 1, 4], max_tokens=10, eos_token_ids=frozenset({ref[2]}))
    stop = req("stop", [3, 1, 4], max_tokens=10, stop_token_ids=frozenset({ref[1]}))
    late = req("late", [3, 1, 4], max_tokens=10, stop_token_ids=frozenset({ref[1]}), min_tokens=2)
    ignore = req("ign", [3, 1, 4], max_tokens=4, eos_token_ids=frozenset({ref[0]}), ignore_eos=True)
    for r in (eos, stop, late, ignore):
        sched.add_request(r)
    run(sched, executor)
    assert (eos.output_token_ids, eos.finish_reason, eos.stop_reason) == (ref[:3], "stop", None)
    assert (stop.output_token_ids, stop.stop_reason) == (ref[:2], ref[1])
    assert late.finish_reason in ("stop", "length") and len(late.output_token_ids) > 2
    assert (ignore.output_token_ids, ignore.finish_reason) == (ref[:4], "length")


def test_abort_frees_blocks_from_any_queue() -> None:
    sched, executor = make(max_num_seqs=1)
    a, b = req("a", list(range(9)), max_tokens=50), req("b", [1, 2, 3])
    sched.add_request(a)
    sched.add_request(b)
    step(sched, executor)
    assert sched.kv_cache.stats().num_used_blocks == 3
    assert sched.finish_request("b", RequestStatus.FINISHED_ABORTED) is b
    assert sched.finish_request("a", RequestStatus.FINISHED_ABORTED) is a
    assert sched.finish_request("a", RequestStatus.FINISHED_ABORTED) is None
    assert a.finish_reason == b.finish_reason == "abort"
    assert sched.kv_cache.stats().num_used_blocks == 0 and not sched.has_unfinished_requests
    assert sched.schedule().is_empty


def test_next_step_is_scheduled_before_the_sampled_token_is_known() -> None:
    sched, executor = make()
    a, b = req("a", [1, 2, 3], max_tokens=5), req("b", [4, 5, 6, 7, 8], max_tokens=5)
    sched.add_request(a)
    sched.add_request(b)
    first = sched.finalize_batch(sched.schedule())
    logits = executor.execute(first)
    # Step 2 scheduled while step 1 "runs": each decode gets a placeholder.
    second = sched.schedule()
    assert [s.token_ids for s in second.sequences] == [[PLACEHOLDER_TOKEN_ID]] * 2
    assert [s.start_pos for s in second.sequences] == [3, 5]
    with pytest.raises(RuntimeError, match="not sampled yet"):
        sched.finalize_batch(ScheduledBatch(0, [s for s in second.sequences]))
    tokens = logits.argmax(-1).tolist()
    sched.update_from_output({"a": tokens[0], "b": tokens[1]})
    sched.finish_request("b", RequestStatus.FINISHED_ABORTED)  # b ends before step 2 is sent
    second = sched.finalize_batch(second)
    assert [(s.request_id, s.token_ids) for s in second.sequences] == [("a", [tokens[0]])]
    sched.update_from_output({"a": int(executor.execute(second).argmax(-1)[0])})
    run(sched, executor)
    assert a.output_token_ids == FakeExecutor.reference([1, 2, 3], 5, VOCAB)
    assert sched.kv_cache.stats().num_used_blocks == 0


def test_no_wasted_slot_when_the_token_in_flight_reaches_max_tokens() -> None:
    sched, _ = make()
    a = req("a", [1, 2, 3], max_tokens=1)
    sched.add_request(a)
    sched.finalize_batch(sched.schedule())
    assert sched.schedule().is_empty  # a's only token is in flight: nothing to compute
