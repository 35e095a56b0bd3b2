"""The PD-aware heatmap: its shape, lookups, and the record stored in etcd."""

from __future__ import annotations

from deepserve.scheduler.heatmap import DEFAULT_HEATMAP, CostModel, HeatmapRecord, build_heatmap


def test_default_disaggregates_long_prompts_with_short_outputs_only() -> None:
    assert DEFAULT_HEATMAP.disaggregate(4096, 0.01)[0]
    assert not DEFAULT_HEATMAP.disaggregate(4096, 2.0)[0]  # long output: colocate
    assert not DEFAULT_HEATMAP.disaggregate(64, 0.01)[0]  # short prompt: colocate


def test_gain_falls_as_the_decode_ratio_grows() -> None:
    row = [DEFAULT_HEATMAP.gain_at(2048, r) for r in DEFAULT_HEATMAP.ratio_edges]
    assert row == sorted(row, reverse=True)


def test_a_slow_interconnect_makes_disaggregation_lose() -> None:
    slow = build_heatmap("m", CostModel(transfer_bytes_per_s=1e7), source="profiled")
    assert not slow.disaggregate(4096, 0.01)[0]


def test_record_round_trips_through_json_and_renders() -> None:
    record = build_heatmap("org/model", CostModel(), source="profiled")
    again = HeatmapRecord.model_validate_json(record.model_dump_json())
    assert again == record
    assert again.cost_model["decode_step_s"] == CostModel().decode_step_s
    assert "D" in again.render()
