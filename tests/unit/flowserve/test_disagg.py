"""PD disaggregation over real gRPC on 127.0.0.1 with the fake executor: a decode engine
fetches KV from a prefill engine; outputs, prefix reuse, aborts, failures, block leaks."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from deepserve.errors import Unavailable
from deepserve.flowserve.engine.async_engine import AsyncEngine, EngineConfig
from deepserve.flowserve.pod.servicer import FlowServeServicer
from deepserve.flowserve.testing.fake_executor import FakeExecutor
from deepserve.records import Role
from deepserve.v1 import flowserve_pb2, flowserve_pb2_grpc
from tests.unit.flowserve.disagg_support import (
    Served,
    generate_request,
    generate_tokens,
    serve,
    settings,
    wait_idle,
)

VOCAB = 97
BS = 4


def make_engine(num_blocks: int = 256, **overrides: object) -> AsyncEngine:
    fields: dict[str, object] = {
        "block_size": BS,
        "num_gpu_blocks": num_blocks,
        "max_num_seqs": 16,
        "step_token_budget": 64,
        "max_model_len": 256,
        "vocab_size": VOCAB,
    }
    fields.update(overrides)
    return AsyncEngine(EngineConfig(**fields), FakeExecutor(num_blocks, BS, VOCAB))  # type: ignore[arg-type]


def segments(directory: Path) -> list[Path]:
    """Shared-memory segments left in the test's segment directory."""
    return list(directory.iterdir())


def prompt(i: int, length: int) -> list[int]:
    return [(i * 31 + j * 7 + 3) % VOCAB for j in range(length)]


class Pair:
    def __init__(self, prefill: Served, decode: Served) -> None:
        self.prefill = prefill
        self.decode = decode
        self.channel = grpc.aio.insecure_channel(decode.address)
        self.stub = flowserve_pb2_grpc.FlowServeServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()
        for side in (self.decode, self.prefill):
            await side.stop()
            side.engine.shutdown()


async def make_pair(
    tmp_path: Path,
    *,
    prefill_cls: type[FlowServeServicer] = FlowServeServicer,
    decode_blocks: int = 256,
    **overrides: object,
) -> Pair:
    transfer = settings(tmp_path, **overrides)
    prefill = await serve(make_engine(), transfer, Role.PREFILL, prefill_cls)
    decode = await serve(make_engine(decode_blocks), transfer, Role.DECODE)
    return Pair(prefill, decode)


@pytest.fixture
def shm_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "shm"
    path.mkdir()
    yield path


@pytest.mark.parametrize("transport", ["shm", "grpc-bytes", "tcp"])
async def test_greedy_outputs_match_colocated_and_reference(shm_dir: Path, transport: str) -> None:
    shared_memory = transport == "shm"
    # TCP: the prefill side offers a connection on its address (a pod offers its own).
    bind = "127.0.0.1" if transport == "tcp" else ""
    pair = await make_pair(
        shm_dir, allow_shared_memory=shared_memory, max_chunk_bytes=64, tcp_bind_host=bind
    )
    colocated = make_engine()
    try:
        for i, (length, max_tokens) in enumerate([(1, 5), (4, 3), (9, 7), (33, 4), (64, 1)]):
            p = prompt(i, length)
            tokens, last = await generate_tokens(
                pair.stub, generate_request(f"r{i}", p, max_tokens, pair.prefill.address)
            )
            expected = [
                t
                async for out in colocated.generate(f"c{i}", p, _greedy(max_tokens))
                for t in out.new_token_ids
            ]
            assert tokens == expected == FakeExecutor.reference(p, max_tokens, VOCAB)
            assert last.usage.prompt_tokens == length
            assert last.usage.completion_tokens == max_tokens
        received = pair.decode.shell.disagg.received
        assert received.transfers == 5 and received.failures == 0
        assert received.shared_memory == (5 if shared_memory else 0)
        assert received.tcp == (5 if transport == "tcp" else 0)
        assert not segments(shm_dir)  # every segment claimed and removed
        for side in (pair.prefill, pair.decode):
            assert not any((await wait_idle(side.engine)).values())
    finally:
        colocated.shutdown()
        await pair.close()


async def test_blocks_the_decode_side_holds_are_not_sent_again(shm_dir: Path) -> None:
    pair = await make_pair(shm_dir)
    try:
        base = prompt(1, 20)  # 5 full blocks
        await generate_tokens(pair.stub, generate_request("a", base, 3, pair.prefill.address))
        received = pair.decode.shell.disagg.received
        assert (received.blocks, received.skipped_blocks) == (5, 0)
        longer = [*base, 5, 6, 7, 8, 9, 10]  # the same 5 blocks, then 2 new ones
        tokens, _ = await generate_tokens(
            pair.stub, generate_request("b", longer, 4, pair.prefill.address)
        )
        assert tokens == FakeExecutor.reference(longer, 4, VOCAB)
        assert (received.blocks, received.skipped_blocks) == (5 + 2, 5)
    finally:
        await pair.close()


async def test_min_tokens_hold_across_the_hand_off(shm_dir: Path) -> None:
    # The prefill instance makes only the first token: min_tokens must not make its one-token
    # request invalid, and the stop id stays masked on both sides until min_tokens are out.
    pair = await make_pair(shm_dir)
    colocated = make_engine()
    try:
        p = prompt(3, 9)
        stop_id = FakeExecutor.reference(p, 1, VOCAB)[0]  # greedy's first pick
        request = generate_request("m", p, 6, pair.prefill.address)
        request.sampling.min_tokens = 3
        request.sampling.stop_token_ids.append(stop_id)
        tokens, last = await generate_tokens(pair.stub, request)
        params = _greedy(6)
        params.min_tokens = 3
        params.stop_token_ids = [stop_id]
        expected = [
            t async for out in colocated.generate("c", p, params) for t in out.new_token_ids
        ]
        assert tokens == expected
        assert stop_id not in tokens[:3]
        assert last.usage.completion_tokens == len(expected)
    finally:
        colocated.shutdown()
        await pair.close()


async def test_no_block_leaks_after_200_requests_with_aborts(shm_dir: Path) -> None:
    # A decode cache of 96 blocks: reservations wait for blocks and preemptions happen.
    # The TTL bounds how long a segment waits for its decode side to claim it: long enough
    # for 25 concurrent requests on a loaded 2-core CI host (0.2 s once removed a segment a
    # live request was about to claim), short enough to check the sweep below.
    pair = await make_pair(shm_dir, decode_blocks=96, segment_ttl_s=2.0)
    rng = random.Random(7)
    outcomes: dict[str, int] = {"ok": 0, "cancelled": 0, "aborted": 0}

    async def one(i: int) -> None:
        p = prompt(i % 23, rng.randint(1, 40))  # repeats: prefix hits on both sides
        max_tokens = rng.randint(1, 12)
        request = generate_request(f"r{i}", p, max_tokens, pair.prefill.address)
        kind = i % 4
        if kind == 0:  # the caller goes away mid-request
            call = pair.stub.Generate(request)
            await asyncio.sleep(rng.random() * 0.01)
            call.cancel()
            outcomes["cancelled"] += 1
            return
        if kind == 1:  # Abort RPC, at a random point (during the transfer or the decode)
            task = asyncio.create_task(generate_tokens(pair.stub, request))
            await asyncio.sleep(rng.random() * 0.01)
            await pair.stub.Abort(flowserve_pb2.AbortRequest(request_id=f"r{i}"))
            tokens, last = await task
            assert last.finish_reason in (1, 2, 3)  # stop, length or abort
            outcomes["aborted"] += 1
            return
        tokens, _ = await generate_tokens(pair.stub, request)
        assert tokens == FakeExecutor.reference(p, max_tokens, VOCAB)
        outcomes["ok"] += 1

    try:
        for start in range(0, 200, 25):
            await asyncio.gather(*(one(i) for i in range(start, start + 25)))
        assert sum(outcomes.values()) == 200
        for side in (pair.prefill, pair.decode):
            state = await wait_idle(side.engine)
            assert state == {"used": 0, "running": 0, "remote": 0, "held": 0}
        # A caller gone between a KV message's send and its receipt leaves that segment
        # unclaimed; its creator removes it after the TTL.
        await asyncio.sleep(2.1)
        pair.prefill.shell.disagg.shared_memory.sweep()
        assert not segments(shm_dir)
    finally:
        await pair.close()


class _FailingPrefill(FlowServeServicer):
    """Sends the first KV message, then fails in the way `mode` names."""

    mode = "error"

    async def Prefill(  # type: ignore[override]
        self, request: flowserve_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[flowserve_pb2.PrefillResponse]:
        stream = super().Prefill(request, context)
        try:
            async for reply in stream:
                yield reply
                if reply.HasField("kv"):
                    break
            if self.mode == "error":
                raise Unavailable("injected: the prefill device failed")
            await asyncio.sleep(3600)  # "hang"
        finally:
            await stream.aclose()  # frees this side's blocks, as a dying stream does


class _ErrorPrefill(_FailingPrefill):
    mode = "error"


class _HangingPrefill(_FailingPrefill):
    mode = "hang"


@pytest.mark.parametrize("failing", [_ErrorPrefill, _HangingPrefill], ids=["error", "hang"])
async def test_prefill_failure_mid_transfer_ends_request_unavailable(
    shm_dir: Path, failing: type[FlowServeServicer]
) -> None:
    pair = await make_pair(shm_dir, prefill_cls=failing, max_chunk_bytes=16, idle_timeout_s=1.0)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await generate_tokens(
                pair.stub, generate_request("f", prompt(3, 40), 5, pair.prefill.address)
            )
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert pair.prefill.address in (info.value.details() or "")
        assert pair.decode.shell.disagg.received.failures == 1
        for side in (pair.prefill, pair.decode):
            assert not any((await wait_idle(side.engine)).values())
        # The pair keeps serving: a normal request on the same decode instance works.
        tokens, _ = await generate_tokens(pair.stub, generate_request("ok", prompt(4, 6), 3))
        assert tokens == FakeExecutor.reference(prompt(4, 6), 3, VOCAB)
    finally:
        await pair.close()


async def test_dead_prefill_instance_is_named_in_unavailable(shm_dir: Path) -> None:
    pair = await make_pair(shm_dir)
    address = pair.prefill.address
    await pair.prefill.server.stop(0)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await generate_tokens(pair.stub, generate_request("d", prompt(5, 9), 3, address))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert address in (info.value.details() or "")
        assert not any((await wait_idle(pair.decode.engine)).values())
    finally:
        await pair.close()


async def test_block_size_mismatch_is_refused(shm_dir: Path) -> None:
    transfer = settings(shm_dir)
    prefill = await serve(make_engine(block_size=8), transfer, Role.PREFILL)
    decode = await serve(make_engine(), transfer, Role.DECODE)
    try:
        async with grpc.aio.insecure_channel(decode.address) as channel:
            stub = flowserve_pb2_grpc.FlowServeServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await generate_tokens(stub, generate_request("m", prompt(1, 9), 2, prefill.address))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "block size" in (info.value.details() or "")
        assert not any((await wait_idle(decode.engine)).values())
    finally:
        for side in (decode, prefill):
            await side.stop()
            side.engine.shutdown()


def _greedy(max_tokens: int):  # type: ignore[no-untyped-def]
    from deepserve.sampling_params import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


async def test_seeded_outputs_match_colocated_and_a_pair_refuses_resumed_tokens(
    shm_dir: Path,
) -> None:
    """The decode side continues the seeded sampler from the prefill's token (one draw in), so a
    seeded PD request yields what a colocated one does; a migrated request resumes on one
    instance only, never through a prefill instance."""
    from deepserve.sampling_params import SamplingParams

    pair = await make_pair(shm_dir)
    colocated = make_engine()
    try:
        p = prompt(3, 9)
        request = generate_request("seeded", p, 12, pair.prefill.address)
        request.sampling.temperature = 2.0
        request.sampling.seed = 99
        tokens, _ = await generate_tokens(pair.stub, request)
        params = SamplingParams(temperature=2.0, seed=99, max_tokens=12)
        expected = [
            t async for out in colocated.generate("c", p, params) for t in out.new_token_ids
        ]
        assert tokens == expected
        assert expected != FakeExecutor.reference(p, 12, VOCAB)  # the seed decided, not argmax
        # Resumed on the decode instance alone (it computes prompt + tokens itself).
        resumed_request = generate_request("resumed", p, 12)
        resumed_request.sampling.CopyFrom(request.sampling)
        resumed_request.output_token_ids.extend(tokens[:5])
        rest, last = await generate_tokens(pair.stub, resumed_request)
        assert tokens[:5] + rest == tokens
        assert last.usage.completion_tokens == 12 and last.usage.prompt_tokens == len(p)
        request.request_id = "refused"
        request.output_token_ids.extend(tokens[:5])
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate_tokens(pair.stub, request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "output_token_ids" in (err.value.details() or "") or any(
            "output_token_ids" in str(v) for _, v in err.value.trailing_metadata() or ()
        )
    finally:
        colocated.shutdown()
        await pair.close()
