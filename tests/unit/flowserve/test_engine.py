"""Engine core and AsyncEngine over the fake executor: async scheduling, aborts, bounds, stats."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest
import torch

from deepserve.errors import InvalidArgument, ResourceExhausted, Unavailable
from deepserve.flowserve.engine.async_engine import (
    AsyncEngine,
    EngineConfig,
    EngineCore,
    GenerationOutput,
)
from deepserve.flowserve.engine.request import Request
from deepserve.flowserve.kv_cache import KVEventRecorder
from deepserve.flowserve.runner.host_transport import ExecutorHostTransport
from deepserve.flowserve.testing.fake_executor import FakeExecutor
from deepserve.sampling_params import SamplingParams

VOCAB = 97
BS = 4


def greedy(max_tokens: int, **kwargs: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)


def prompts(n: int) -> list[list[int]]:
    return [[(i * 31 + j * 7 + 3) % VOCAB for j in range(1 + (i * 11) % 37)] for i in range(n)]


def config(**overrides: object) -> EngineConfig:
    fields: dict[str, object] = {
        "block_size": BS,
        "num_gpu_blocks": 256,
        "max_num_seqs": 8,
        "step_token_budget": 32,
        "max_model_len": 128,
        "vocab_size": VOCAB,
    }
    fields.update(overrides)
    return EngineConfig(**fields)  # type: ignore[arg-type]


def run_core(
    cfg: EngineConfig,
    reqs: Sequence[tuple[list[int], int]],
    eos: Sequence[int] = (),
) -> tuple[dict[str, list[int]], dict[str, list[GenerationOutput]], EngineCore, FakeExecutor]:
    executor = FakeExecutor(cfg.num_gpu_blocks or 0, cfg.block_size, VOCAB)
    transport = ExecutorHostTransport(executor) if cfg.num_host_blocks else None
    core = EngineCore(cfg, executor, eos_token_ids=eos, host_transport=transport)
    for i, (prompt, max_tokens) in enumerate(reqs):
        core.add_request(Request(f"r{i}", prompt, max_tokens, sampling_params=greedy(max_tokens)))
    outputs: dict[str, list[GenerationOutput]] = {}
    for out in core.drain():
        outputs.setdefault(out.request_id, []).append(out)
    tokens = {rid: [t for o in outs for t in o.new_token_ids] for rid, outs in outputs.items()}
    return tokens, outputs, core, executor


# Engine settings that stress step planning: each must leave the generated tokens unchanged.
PLANNING_CASES: list[dict[str, object]] = [
    {},
    {"num_gpu_blocks": 14, "step_token_budget": 8},  # preemption under pressure
    {"num_gpu_blocks": 14, "num_host_blocks": 32},  # evicted prefixes come back from host
    {"enable_prefix_caching": False},
]


@pytest.mark.parametrize("overrides", PLANNING_CASES)
def test_async_and_serial_scheduling_give_identical_greedy_tokens(overrides: dict) -> None:
    base = prompts(10)
    # Repeat prompts so prefix hits (and host-tier populates) happen mid-run.
    reqs = [(p, 10) for p in base] + [([*p, 5], 6) for p in base[::2]]
    eos = [7]
    serial, _, serial_core, _ = run_core(config(async_scheduling=False, **overrides), reqs, eos)
    pipelined, outs, core, _ = run_core(config(async_scheduling=True, **overrides), reqs, eos)
    assert pipelined == serial
    for i, (prompt, max_tokens) in enumerate(reqs):
        assert pipelined[f"r{i}"] == FakeExecutor.reference(prompt, max_tokens, VOCAB, eos)
        assert outs[f"r{i}"][-1].finish_reason in ("stop", "length")
    for c in (core, serial_core):
        assert c.kv_cache.stats().num_used_blocks == 0
        assert not c.has_work
    if overrides.get("num_gpu_blocks") == 14 and "num_host_blocks" not in overrides:
        assert core.planner.num_preemptions > 0
    if "num_host_blocks" in overrides:
        assert core.kv_cache.stats().host_hit_tokens > 0


def test_async_scheduling_drops_slots_of_requests_finished_in_flight() -> None:
    # EOS at step N is only known after step N+1 was scheduled: that slot must not be run.
    reqs = [(p, 30) for p in prompts(6)]
    eos = [FakeExecutor.reference(reqs[0][0], 30, VOCAB)[3]]
    tokens, _, core, executor = run_core(config(), reqs, eos)
    for i, (prompt, _) in enumerate(reqs):
        expected = FakeExecutor.reference(prompt, 30, VOCAB, eos)
        assert tokens[f"r{i}"] == expected
        logit_rows = sum(
            1
            for b in executor.plans
            for s in b.sequences
            if s.request_id == f"r{i}" and s.needs_logits
        )
        assert logit_rows == len(expected)  # no forward slot wasted on a finished request
    assert tokens["r0"][-1] == eos[0]
    assert core.kv_cache.stats().num_used_blocks == 0


def test_prefix_hit_reports_cached_tokens_and_same_output() -> None:
    prompt = list(range(1, 23))
    tokens, outs, core, _ = run_core(config(), [(prompt, 5)])
    executor = core.executor
    core.add_request(Request("again", prompt, 5, sampling_params=greedy(5)))
    again = core.drain()
    assert [t for o in again for t in o.new_token_ids] == tokens["r0"]
    assert outs["r0"][0].num_cached_tokens == 0
    assert again[-1].num_cached_tokens == 20 and again[-1].num_prompt_tokens == 22
    assert core.stats().prefix_cache_hit_rate == pytest.approx(20 / 44)
    assert isinstance(executor, FakeExecutor)


def test_stop_string_ends_request_and_trims_text() -> None:
    from deepserve.flowserve.engine.output_processor import detokenizer_factory_for

    class Letters:
        def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
            return "".join(chr(97 + i % 26) for i in ids)

    prompt = [1, 2, 3]
    ref = FakeExecutor.reference(prompt, 20, VOCAB)
    text = "".join(chr(97 + t % 26) for t in ref)
    stop = text[5:7]
    cut = text.find(stop)
    for async_scheduling in (False, True):
        executor = FakeExecutor(64, BS, VOCAB)
        core = EngineCore(
            config(num_gpu_blocks=64, async_scheduling=async_scheduling),
            executor,
            detokenizer_factory=detokenizer_factory_for(Letters()),
        )
        core.add_request(Request("s", prompt, 20, sampling_params=greedy(20, stop=[stop])))
        outs = core.drain()
        assert "".join(o.new_text for o in outs) == text[:cut]
        assert outs[-1].finish_reason == "stop" and outs[-1].stop_reason == stop
        assert len(outs) <= cut + 2
        assert core.kv_cache.stats().num_used_blocks == 0


def test_logprobs_are_reported_when_asked() -> None:
    executor = FakeExecutor(64, BS, VOCAB)
    core = EngineCore(config(num_gpu_blocks=64), executor)
    params = greedy(3, logprobs=True, top_logprobs=2)
    core.add_request(Request("lp", [4, 5], 3, sampling_params=params))
    core.add_request(Request("plain", [4, 5], 3, sampling_params=greedy(3)))
    outs = core.drain()
    lp = [o for o in outs if o.request_id == "lp"]
    assert all(o.logprobs and o.logprobs[0].token_id == o.new_token_ids[0] for o in lp)
    assert all(len(o.logprobs[0].top) == 2 for o in lp if o.logprobs)
    assert lp[0].logprobs[0].top[0][0] == lp[0].new_token_ids[0]
    assert all(o.logprobs is None for o in outs if o.request_id == "plain")


def test_kv_events_follow_the_cache() -> None:
    recorder = KVEventRecorder()
    executor = FakeExecutor(64, BS, VOCAB)
    core = EngineCore(config(num_gpu_blocks=64), executor, kv_event_listener=recorder)
    core.add_request(Request("a", list(range(13)), 2, sampling_params=greedy(2)))
    core.drain()
    # 13 prompt + 1 fed-back output token = 14 tokens with KV: 3 full blocks cached.
    assert len(recorder.held["device"]) == 3


# ----- AsyncEngine ----------------------------------------------------------------------------


async def collect(engine: AsyncEngine, rid: str, prompt: list[int], params: SamplingParams):
    outs = []
    async for out in engine.generate(rid, prompt, params):
        outs.append(out)
    return outs


async def wait_until(predicate, timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def make_engine(cfg: EngineConfig, gate: threading.Event | None = None) -> AsyncEngine:
    executor = FakeExecutor(cfg.num_gpu_blocks or 0, cfg.block_size, VOCAB, gate=gate)
    return AsyncEngine(cfg, executor)


async def test_concurrent_requests_equal_each_run_alone() -> None:
    base = prompts(16)
    lengths = [3 + (i * 7) % 20 for i in range(16)]
    engine = make_engine(config(num_gpu_blocks=64, step_token_budget=24))
    try:
        results = await asyncio.gather(
            *(
                collect(engine, f"c{i}", p, greedy(n))
                for i, (p, n) in enumerate(zip(base, lengths, strict=True))
            )
        )
        alone = make_engine(config(num_gpu_blocks=64))
        try:
            for i, (p, n) in enumerate(zip(base, lengths, strict=True)):
                single = await collect(alone, f"a{i}", p, greedy(n))
                got = [t for o in results[i] for t in o.new_token_ids]
                assert got == [t for o in single for t in o.new_token_ids]
                assert got == FakeExecutor.reference(p, n, VOCAB)
                last = results[i][-1]
                assert (last.finish_reason, last.num_output_tokens) == ("length", n)
                assert last.num_prompt_tokens == len(p)
        finally:
            alone.shutdown()
        await wait_until(lambda: engine.stats().kv_blocks_used == 0)
        stats = engine.stats()
        assert stats.kv_blocks_total == 64 and stats.kv_blocks_free == 64
        assert stats.num_running == stats.num_waiting == 0
        assert stats.generation_tokens_per_s > 0 and stats.num_steps > 0
    finally:
        engine.shutdown()


async def test_abort_and_early_close_free_every_block() -> None:
    engine = make_engine(config(num_gpu_blocks=64, max_model_len=250))
    try:
        gen = engine.generate("closed", list(range(30)), greedy(200))
        first = await gen.__anext__()
        assert first.new_token_ids
        await gen.aclose()  # consumer stops: the request is aborted

        outs: list[GenerationOutput] = []

        async def consume() -> None:
            async for out in engine.generate("aborted", list(range(40, 70)), greedy(200)):
                outs.append(out)
                if len(outs) == 2:
                    assert engine.abort("aborted")

        await asyncio.wait_for(consume(), 20)
        assert outs[-1].finish_reason == "abort" and len(outs) < 200
        assert not engine.abort("unknown")
        await wait_until(
            lambda: engine.stats().kv_blocks_used == 0 and engine.stats().num_running == 0
        )
    finally:
        engine.shutdown()


async def test_queue_bound_raises_only_at_the_limit() -> None:
    gate = threading.Event()
    engine = make_engine(config(num_gpu_blocks=64, max_num_seqs=1, max_queue_len=2), gate)
    try:
        running = asyncio.ensure_future(collect(engine, "run", [1, 2], greedy(2)))
        await wait_until(lambda: engine.stats().num_running == 1)
        queued = [
            asyncio.ensure_future(collect(engine, f"q{i}", [3, i], greedy(2))) for i in range(2)
        ]
        await asyncio.sleep(0.05)
        with pytest.raises(ResourceExhausted):
            await collect(engine, "over", [4], greedy(2))
        gate.set()
        for task in [running, *queued]:
            outs = await asyncio.wait_for(task, 20)
            assert outs[-1].finish_reason == "length"
        # Room again once the queue drained.
        assert (await collect(engine, "after", [4], greedy(1)))[-1].num_output_tokens == 1
    finally:
        gate.set()
        engine.shutdown()


async def test_input_validation_names_the_field() -> None:
    engine = make_engine(config(num_gpu_blocks=16, max_model_len=40))  # 64 KV slots
    try:
        cases = [
            ([], greedy(4), "prompt_token_ids"),
            ([1, VOCAB], greedy(4), "prompt_token_ids"),
            (list(range(40)), greedy(1), "prompt_token_ids"),
            (list(range(30)), greedy(11), "max_tokens"),
            ([1], SamplingParams(temperature=-1.0), "temperature"),
        ]
        for prompt, params, field in cases:
            with pytest.raises(InvalidArgument) as exc:
                await collect(engine, "bad", prompt, params)
            assert exc.value.field == field
        # max_tokens left unset fills the context window.
        outs = await collect(engine, "fill", list(range(30)), SamplingParams(temperature=0.0))
        assert outs[-1].num_output_tokens == 10 and outs[-1].finish_reason == "length"
    finally:
        engine.shutdown()


async def test_request_too_big_for_kv_cache_is_rejected() -> None:
    engine = make_engine(config(num_gpu_blocks=4, max_model_len=128))  # 16 KV slots
    try:
        with pytest.raises(InvalidArgument) as exc:
            await collect(engine, "big", list(range(10)), greedy(10))
        assert exc.value.field == "max_tokens"
        outs = await collect(engine, "ok", list(range(10)), greedy(6))
        assert outs[-1].num_output_tokens == 6
    finally:
        engine.shutdown()


class BrokenExecutor(FakeExecutor):
    def _run(self, batch):  # type: ignore[no-untyped-def]
        raise RuntimeError("device lost")


async def test_executor_failure_fails_requests_and_engine_survives() -> None:
    cfg = config(num_gpu_blocks=64)
    engine = AsyncEngine(cfg, BrokenExecutor(64, BS, VOCAB))
    try:
        with pytest.raises(Unavailable, match="device lost"):
            await collect(engine, "x", [1, 2, 3], greedy(3))
        assert engine.stats().kv_blocks_used == 0
    finally:
        engine.shutdown()


async def test_shutdown_ends_open_streams() -> None:
    gate = threading.Event()
    engine = make_engine(config(num_gpu_blocks=64), gate)
    task = asyncio.ensure_future(collect(engine, "x", [1, 2, 3], greedy(3)))
    await wait_until(lambda: engine.stats().num_running == 1)
    threading.Timer(0.05, gate.set).start()
    await asyncio.to_thread(engine.shutdown)
    with pytest.raises(Unavailable):
        await asyncio.wait_for(task, 20)


def test_logits_rows_must_match(monkeypatch: pytest.MonkeyPatch) -> None:
    executor = FakeExecutor(16, BS, VOCAB)
    core = EngineCore(config(num_gpu_blocks=16, async_scheduling=False), executor)
    monkeypatch.setattr(executor, "execute", lambda batch: torch.zeros(5, VOCAB))
    core.add_request(Request("a", [1], 2, sampling_params=greedy(2)))
    with pytest.raises(RuntimeError, match="rows"):
        core.step()


async def test_context_pin_through_the_engine_thread() -> None:
    engine = make_engine(config(num_gpu_blocks=64))
    try:
        prompt = list(range(3, 20))
        await collect(engine, "ctx", prompt, greedy(1))
        pinned = await asyncio.wrap_future(
            engine.call_in_engine(lambda core: core.kv_cache.pin("doc-1", prompt))
        )
        assert pinned == 16
        match = await asyncio.wrap_future(
            engine.call_in_engine(lambda core: core.kv_cache.match_id("doc-1"))
        )
        assert match is not None and match.num_tokens == 16
        await wait_until(lambda: engine.stats().kv_blocks_used == 4)  # the pin holds them
        out = await collect(engine, "next", prompt, greedy(1))
        assert out[-1].num_cached_tokens == 16
        assert engine.stats().kv_blocks_used == 4
    finally:
        engine.shutdown()


def test_block_count_comes_from_executor_or_memory_budget() -> None:
    executor = FakeExecutor(12, BS, VOCAB)
    core = EngineCore(config(num_gpu_blocks=None), executor)
    assert core.kv_cache.stats().num_blocks == 12
    with pytest.raises(ValueError, match="executor has 12"):
        EngineCore(config(num_gpu_blocks=13), executor)
    budget = EngineConfig(num_gpu_blocks=None, kv_cache_memory_bytes=10_000)
    assert budget.resolve_num_gpu_blocks(bytes_per_block=3_000) == 3
    with pytest.raises(ValueError):
        budget.resolve_num_gpu_blocks()


def test_a_request_that_arrives_during_a_step_joins_the_next_one() -> None:
    # The pipelined core plans step N+1 while step N runs; a request queued meanwhile comes in
    # through `intake` once step N is done and joins N+1 instead of waiting for N+2.
    cfg = config(async_scheduling=True)
    executor = FakeExecutor(cfg.num_gpu_blocks or 0, cfg.block_size, VOCAB)
    core = EngineCore(cfg, executor)
    first, later = prompts(2)
    core.add_request(Request("first", first, 4, sampling_params=greedy(4)))
    outputs = core.step()  # step 1 submitted: the first prompt
    arrived = Request("later", later, 4, sampling_params=greedy(4))

    def intake() -> list[GenerationOutput]:
        core.add_request(arrived)
        return []

    outputs += core.step(intake)  # step 2 was planned before `later` arrived
    outputs += core.step()  # waits for step 2, which the executor then holds
    assert [(s.request_id, len(s.token_ids)) for s in executor.plans[1].sequences] == [
        ("first", 1),
        ("later", len(later)),
    ]
    tokens: dict[str, list[int]] = {}
    for out in outputs + core.drain():
        tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert tokens == {
        "first": FakeExecutor.reference(first, 4, VOCAB),
        "later": FakeExecutor.reference(later, 4, VOCAB),
    }
    assert core.kv_cache.stats().num_used_blocks == 0
