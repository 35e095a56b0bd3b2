"""What a warm pod loads before any model: the tokenizers of the configured models and of the
DRAM copies on its host, once each; names that resolve to nothing are skipped."""

from __future__ import annotations

from pathlib import Path

from deepserve.flowserve.pod.startup import preload_tokenizers, tokenizers_to_preload
from deepserve.flowserve.settings import FlowServeSettings
from deepserve.scaling.weights_cache import WeightsCacheLayout
from deepserve.tokenizer.cache import shared_tokenizers
from tests.tiny_model import make_tiny_llama


def test_configured_models_and_host_copies_are_preloaded(tmp_path: Path) -> None:
    configured = make_tiny_llama(tmp_path / "configured")
    copied = make_tiny_llama(tmp_path / "copied", seed=1)
    layout = WeightsCacheLayout(tmp_path / "weights")
    staging = layout.new_staging_dir()
    entry = layout.publish(
        staging, model="copied", model_dir=copied, dtype="float32", tp_size=1, nbytes=0,
        origin="preload",
    )  # fmt: skip
    settings = FlowServeSettings(
        preload_tokenizers=f"{configured}, {tmp_path / 'not-a-model'},{configured}",
        weights_cache_dir=layout.root,
    )
    assert tokenizers_to_preload(settings) == [configured, entry.path]
    assert preload_tokenizers(settings) == [configured, entry.path]
    assert shared_tokenizers.contains(configured) and shared_tokenizers.contains(copied)
    # A pod told not to use the host's copies does not load theirs either.
    off = settings.model_copy(update={"use_weights_cache": False})
    assert tokenizers_to_preload(off) == [configured]


def test_a_warm_pod_maps_the_hosts_copies_once_and_drops_replaced_ones(tmp_path: Path) -> None:
    import torch

    from deepserve.flowserve.model.config import ModelConfig
    from deepserve.flowserve.model.premapped import premapped
    from deepserve.flowserve.model.prepared_weights import open_prepared, prepare_copy
    from deepserve.flowserve.pod.startup import premap_dram_copies

    model_dir = make_tiny_llama(tmp_path / "tiny")
    layout = WeightsCacheLayout(tmp_path / "weights")
    entry = prepare_copy("tiny", model_dir, layout, dtype=torch.float32)
    settings = FlowServeSettings(weights_cache_dir=layout.root, dtype="float32")
    premapped.clear()
    try:
        assert premap_dram_copies(settings) == 1
        assert premap_dram_copies(settings) == 0  # already mapped: nothing new
        mapped = premapped.get(entry.rank_path(0))
        assert mapped is not None
        # The load takes the premapped tensors (the same memory), not a new mapping.
        config = ModelConfig.from_model_dir(entry.path)
        weights = open_prepared(entry.path, config, device="cpu", dtype=torch.float32,
                                tp_rank=0, tp_size=1)  # fmt: skip
        assert weights is not None
        assert weights.embed.data_ptr() == mapped["embed"].data_ptr()
        # A budget too small for the copy maps nothing; a replaced copy is dropped.
        premapped.clear()
        small = settings.model_copy(update={"premap_dram_copies_mb": 0})
        assert premap_dram_copies(small) == 0
        assert premap_dram_copies(settings) == 1
        rank = entry.rank_path(0)
        data = rank.read_bytes()
        rank.unlink()
        rank.write_bytes(data)  # a new file at the same path
        assert premapped.get(rank) is None
        assert premapped.prune() == 1
    finally:
        premapped.clear()
