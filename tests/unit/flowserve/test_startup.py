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
