"""Fork and the pod's weights steps: a real gRPC server streams a tiny Llama's loaded weights to
several targets at once; the targets' published copy equals the source; a dead source falls
back to the disk; the KV profile is written to (real) etcd once and reused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import torch

from deepserve.errors import InvalidArgument
from deepserve.flowserve.model.config import ModelConfig
from deepserve.flowserve.model.llama_weights import LlamaWeights
from deepserve.flowserve.model.prepared_weights import flatten_llama_weights
from deepserve.flowserve.model.weights import load_llama_weights
from deepserve.flowserve.pod.fork import receive_weights
from deepserve.flowserve.pod.scale_up import ModelLoadSteps
from deepserve.flowserve.pod.servicer import FlowServeServicer
from deepserve.flowserve.settings import FlowServeSettings
from deepserve.rpc.errors import DomainErrorInterceptor
from deepserve.scaling.timeline import ScaleStep, WeightsSource
from deepserve.scaling.weights_cache import WeightsCacheLayout
from deepserve.scaling.weights_plan import WeightsPlan
from deepserve.store.etcd import EtcdStore
from deepserve.store.keys import Keys
from deepserve.v1 import flowserve_pb2_grpc
from tests.tiny_model import make_tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("fork") / "tiny-llama")


class SourceShell:
    """The part of TaskExecutorShell a fork source needs: a loaded engine of one model."""

    def __init__(self, model: str, weights: LlamaWeights) -> None:
        self.model = model
        # Where a bulk (TCP) fork's socket listens: the pod's own address.
        self.settings = SimpleNamespace(common=SimpleNamespace(host="127.0.0.1"))
        runner = SimpleNamespace(model=SimpleNamespace(weights=weights))
        self.engine = SimpleNamespace(core=SimpleNamespace(executor=SimpleNamespace(runner=runner)))

    def require_engine(self, model: str) -> Any:
        if model and model != self.model:
            raise InvalidArgument(f"this instance serves {self.model!r}", field="model")
        return self.engine


@pytest.fixture
async def source(model_dir: Path) -> AsyncIterator[tuple[str, LlamaWeights]]:
    weights = load_llama_weights(model_dir, ModelConfig.from_model_dir(model_dir))
    server = grpc.aio.server(interceptors=[DomainErrorInterceptor()])
    shell = SourceShell(str(model_dir), weights)
    flowserve_pb2_grpc.add_FlowServeServiceServicer_to_server(FlowServeServicer(shell), server)  # type: ignore[arg-type]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", weights
    await server.stop(None)


@pytest.mark.parametrize(
    "via", ["stream", "bulk tcp", "shared memory"], ids=["stream", "bulk-tcp", "shared-memory"]
)
async def test_one_source_feeds_many_targets_at_once(
    source: tuple[str, LlamaWeights], model_dir: Path, tmp_path: Path, via: str
) -> None:
    address, weights = source
    layout = WeightsCacheLayout(tmp_path / "cache")
    results = await asyncio.gather(
        *(
            receive_weights(
                address, model=str(model_dir), model_dir=model_dir, layout=layout,
                dtype=torch.float32, max_chunk_bytes=4096, shared_memory=via == "shared memory",
                bulk_tcp=via == "bulk tcp",
            )
            for _ in range(4)
        )
    )  # fmt: skip
    expected = sum(t.numel() * t.element_size() for t in flatten_llama_weights(weights).values())
    assert all(r.nbytes >= expected for r in results)
    assert {r.via for r in results} == {via}
    # Every target published the same copy: one per host, the first writer's.
    [entry] = layout.entries()
    assert entry.origin == "fork" and {r.entry.path for r in results} == {entry.path}
    forked = load_llama_weights(entry.path, ModelConfig.from_model_dir(model_dir))
    for name, tensor in flatten_llama_weights(weights).items():
        assert torch.equal(flatten_llama_weights(forked)[name], tensor), name
    assert forked.lm_head is forked.embed  # tied embeddings stay tied


async def test_a_source_of_another_model_refuses(
    source: tuple[str, LlamaWeights], tmp_path: Path, model_dir: Path
) -> None:
    address, _ = source
    layout = WeightsCacheLayout(tmp_path / "cache")
    with pytest.raises(InvalidArgument, match="serves"):
        await receive_weights(
            address, model="other", model_dir=model_dir, layout=layout, dtype=torch.float32
        )
    assert layout.entries() == [] and not any(layout.root.iterdir())  # staging cleaned up


@pytest.fixture
async def etcd(etcd_endpoint: str) -> AsyncIterator[EtcdStore]:
    async with EtcdStore(etcd_endpoint) as store:
        await store.delete_prefix(Keys.kv_profiles_prefix())
        yield store
        await store.delete_prefix(Keys.kv_profiles_prefix())


def settings(tmp_path: Path) -> FlowServeSettings:
    return FlowServeSettings(
        device="cpu", weights_cache_dir=tmp_path / "cache", kv_cache_memory_mb=1
    )


def built(weights_dir: Path, s: FlowServeSettings) -> tuple[Path, int]:
    return weights_dir, s.kv_cache_blocks


async def test_load_forks_then_maps_then_falls_back_to_disk(
    source: tuple[str, LlamaWeights], model_dir: Path, tmp_path: Path, etcd: EtcdStore
) -> None:
    address, _ = source
    model = str(model_dir)
    fork = WeightsPlan(WeightsSource.FORK, fork_from=address)

    steps = ModelLoadSteps(settings(tmp_path), etcd, None)
    weights_dir, blocks = await steps.load_engine(model, model_dir, 1, fork, built)
    assert steps.timeline.weights_source == WeightsSource.FORK
    assert weights_dir.parent == tmp_path / "cache" and blocks > 0
    detail = steps.timeline.steps[0].detail
    assert f"fork from {address}" in detail and "KV blocks" in detail and "profiled now" in detail

    # The fork left a copy on this host: the next load maps it, and reuses the KV profile.
    again = ModelLoadSteps(settings(tmp_path), etcd, None)
    assert (await again.load_engine(model, model_dir, 1, fork, built)) == (weights_dir, blocks)
    assert again.timeline.weights_source == WeightsSource.DRAM
    assert "profiled earlier" in again.timeline.steps[0].detail

    # A dead source and no copy: the disk, saying why.
    dead = WeightsPlan(WeightsSource.FORK, fork_from="127.0.0.1:1")
    fallback = ModelLoadSteps(settings(tmp_path / "empty"), etcd, None)
    weights_dir, _ = await fallback.load_engine(model, model_dir, 1, dead, built)
    assert weights_dir == model_dir
    assert fallback.timeline.weights_source == WeightsSource.DISK
    assert "fork from 127.0.0.1:1 failed" in fallback.timeline.steps[0].detail
    assert [s.step for s in fallback.timeline.steps] == [ScaleStep.WEIGHTS_LOADED]
