"""PD disaggregation on a tiny random Llama over real gRPC: greedy tokens identical to
colocated serving, whole-request and layer-by-layer, with the prefix cache on both sides."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
import torch

from deepserve.flowserve.engine.async_engine import AsyncEngine, EngineConfig
from deepserve.flowserve.runner.executor import UniprocExecutor
from deepserve.records import Role
from deepserve.sampling_params import SamplingParams
from deepserve.v1 import flowserve_pb2, flowserve_pb2_grpc
from tests.unit.flowserve.disagg_support import (
    generate_request,
    generate_tokens,
    serve,
    settings,
    wait_idle,
)
from tests.unit.flowserve.runner.tiny_models import save_tiny_model

BS = 4
MAX_NEW = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    # Wide random weights: the next token depends on the whole context (so on every KV block).
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def make_engine(model_dir: Path, *, max_batched: int = 32) -> AsyncEngine:
    executor = UniprocExecutor(
        model_dir, num_blocks=96, block_size=BS, device="cpu", dtype=torch.float32
    )
    config = EngineConfig(
        block_size=BS,
        num_gpu_blocks=96,
        max_num_seqs=8,
        step_token_budget=max_batched,
        max_model_len=256,
    )
    return AsyncEngine.from_executor(config, executor)


def prompts() -> list[list[int]]:
    base = [(i * 37 + 11) % 250 + 3 for i in range(45)]
    return [
        base[:1],
        base[:7],
        base[:20],
        base,  # shares 20 tokens (5 blocks) with the previous one
        [*base[:20], 99, 98, 97],
    ]


def greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)


@pytest.mark.parametrize(
    ("mode", "tcp"),
    [
        (flowserve_pb2.KV_TRANSFER_MODE_WHOLE_REQUEST, False),
        (flowserve_pb2.KV_TRANSFER_MODE_LAYERWISE, False),
        (flowserve_pb2.KV_TRANSFER_MODE_LAYERWISE, True),
    ],
    ids=["whole", "layerwise", "layerwise-tcp"],
)
async def test_greedy_tokens_match_colocated(
    model_dir: Path, tmp_path: Path, mode: int, tcp: bool
) -> None:
    colocated = make_engine(model_dir)
    # A small step budget on the prefill side: long prompts run in several chunks. With `tcp`
    # the pair passes KV as on two hosts: bytes over the TCP connection the prefill side offers.
    transfer = settings(
        tmp_path,
        max_chunk_bytes=2048,
        allow_shared_memory=not tcp,
        tcp_bind_host="127.0.0.1" if tcp else "",
    )
    prefill = await serve(make_engine(model_dir, max_batched=16), transfer, Role.PREFILL)
    decode = await serve(make_engine(model_dir), transfer, Role.DECODE)
    try:
        expected = []
        for i, p in enumerate(prompts()):
            tokens = [
                t
                async for out in colocated.generate(f"c{i}", p, greedy())
                for t in out.new_token_ids
            ]
            expected.append(tokens)
        async with grpc.aio.insecure_channel(decode.address) as channel:
            stub = flowserve_pb2_grpc.FlowServeServiceStub(channel)
            got = []
            for i, p in enumerate(prompts()):
                request = generate_request(f"r{i}", p, MAX_NEW, prefill.address, mode)
                request.sampling.ignore_eos = True
                tokens, _ = await generate_tokens(stub, request)
                got.append(tokens)
            # Concurrent requests too: transfers interleave with decoding steps.
            concurrent = await asyncio.gather(
                *(
                    generate_tokens(
                        stub,
                        _ignore_eos(generate_request(f"k{i}", p, MAX_NEW, prefill.address, mode)),
                    )
                    for i, p in enumerate(prompts())
                )
            )
        assert got == expected
        assert [t for t, _ in concurrent] == expected
        received = decode.shell.disagg.received
        assert received.transfers == 2 * len(prompts()) and received.failures == 0
        layerwise = mode == flowserve_pb2.KV_TRANSFER_MODE_LAYERWISE
        assert received.layerwise == (received.transfers if layerwise else 0)
        assert received.tcp == (received.transfers if tcp else 0)
        assert received.skipped_blocks > 0  # the decode side's prefix cache was used
        for side in (prefill, decode):
            state = await wait_idle(side.engine)
            assert state == {"used": 0, "running": 0, "remote": 0, "held": 0}
    finally:
        colocated.shutdown()
        for side in (decode, prefill):
            await side.stop()
            side.engine.shutdown()


def _ignore_eos(request: flowserve_pb2.GenerateRequest) -> flowserve_pb2.GenerateRequest:
    request.sampling.ignore_eos = True
    return request
