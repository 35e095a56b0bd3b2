"""`deepserve profile`: measure the cost model on a real (tiny) engine, store the heatmap in a
real etcd, and see a scheduler's heatmap table pick it up by watch."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepserve.cli.profile import _fit_line, profile_model, store_heatmap
from deepserve.scheduler.heatmap import CostModel, HeatmapRecord
from deepserve.scheduler.heatmap_table import HeatmapTable
from deepserve.store.etcd import EtcdStore
from deepserve.store.keys import Keys
from tests.tiny_model import make_tiny_llama


def test_line_fit_recovers_fixed_and_per_token_cost() -> None:
    xs = [10, 20, 40, 80]
    a, b = _fit_line(xs, [0.5 + 0.01 * x for x in xs])
    assert a == pytest.approx(0.5)
    assert b == pytest.approx(0.01)


async def test_profile_measures_and_stores_a_heatmap(tmp_path: Path, etcd_endpoint: str) -> None:
    import torch

    torch.set_num_threads(1)
    model_dir = make_tiny_llama(tmp_path / "tiny")
    record = await profile_model(
        "tiny-profiled",
        model_dir,
        device="cpu",
        transfer_bytes_per_s=5e9,
        prompt_lengths=(16, 64, 128),
        decode_batch=2,
    )
    assert record.source == "profiled"
    cost = CostModel(**record.cost_model)
    assert cost.decode_step_s > 0
    assert cost.transfer_bytes_per_s == 5e9
    # tiny Llama: 2 layers x 2 KV heads x head_dim 16 x (K and V) x 2 bytes
    assert cost.kv_bytes_per_token == 2 * 2 * 2 * 16 * 2
    assert len(record.gain) == len(record.prompt_edges)
    async with EtcdStore(etcd_endpoint) as etcd:
        await etcd.delete_prefix(Keys.heatmaps_prefix())
        table = HeatmapTable(etcd)
        table.start()
        try:
            assert table.for_model("tiny-profiled").source == "default"
            await store_heatmap(etcd_endpoint, record)
            assert table.informer is not None
            assert await table.informer.wait_for(lambda items: "tiny-profiled" in items, 5)
            stored: HeatmapRecord = table.for_model("tiny-profiled")
            assert stored == record
        finally:
            await table.stop()
            await etcd.delete_prefix(Keys.heatmaps_prefix())
