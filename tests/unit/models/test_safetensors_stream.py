from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from deepserve.models.safetensors_stream import (
    SafetensorsStreamWriter,
    TensorSpec,
    float32_to_bfloat16_bits,
)


def test_bfloat16_rounding_matches_torch_including_ties_and_specials() -> None:
    specials = np.array(
        [0.0, -0.0, 1.0, np.inf, -np.inf, np.nan, 1 + 2**-8, 1 + 3 * 2**-8, 3.4e38, 1e-40],
        dtype=np.float32,
    )
    values = np.concatenate(
        [specials, np.random.default_rng(0).standard_normal(1000).astype(np.float32)]
    )
    ours = torch.from_numpy(float32_to_bfloat16_bits(values).view(np.int16)).view(torch.bfloat16)
    theirs = torch.from_numpy(values).to(torch.bfloat16)
    assert torch.equal(ours.isnan(), theirs.isnan())
    assert torch.equal(ours[~ours.isnan()], theirs[~theirs.isnan()])


def test_streamed_file_reads_back_with_safetensors(tmp_path: Path) -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([0.5, -1.5, 7.0], dtype=np.float32)
    specs = [TensorSpec("a", (2, 3), "float32"), TensorSpec("b", (3,), "float32")]
    with SafetensorsStreamWriter(tmp_path / "m.safetensors", specs, {"format": "pt"}) as out:
        out.write("a", a)
        out.write("b", b)
    loaded = load_file(tmp_path / "m.safetensors")
    np.testing.assert_array_equal(loaded["a"], a)
    np.testing.assert_array_equal(loaded["b"], b)


def test_writer_refuses_out_of_order_and_missing_tensors(tmp_path: Path) -> None:
    specs = [TensorSpec("a", (2,), "float32"), TensorSpec("b", (2,), "float32")]
    writer = SafetensorsStreamWriter(tmp_path / "m.safetensors", specs, {})
    with pytest.raises(ValueError, match="expected tensor a"):
        writer.write("b", np.zeros(2, dtype=np.float32))
    writer.write("a", np.zeros(2, dtype=np.float32))
    with pytest.raises(ValueError, match="only 1 of 2"):
        writer.close()
