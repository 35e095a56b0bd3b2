"""The physical paged KV cache: slot writes, block copies, host round trips, sizing."""

from __future__ import annotations

import sys

import pytest
import torch

from deepserve.errors import InvalidArgument
from deepserve.flowserve.runner.kv_cache_tensors import KVCacheTensors


def _cache(num_blocks: int = 8) -> KVCacheTensors:
    return KVCacheTensors(
        num_layers=3,
        num_blocks=num_blocks,
        block_size=4,
        num_kv_heads=2,
        head_dim=5,
        dtype=torch.float32,
        device="cpu",
    )


def test_write_places_tokens_at_their_slots() -> None:
    cache = _cache()
    key = torch.randn(3, 2, 5)
    value = torch.randn(3, 2, 5)
    # slot = block * block_size + offset: block 2 offset 1, block 5 offsets 0 and 3.
    cache.write(1, torch.tensor([9, 20, 23]), key, value)
    k, v = cache.key_value(1)
    assert torch.equal(k[2, 1], key[0]) and torch.equal(k[5, 0], key[1])
    assert torch.equal(v[5, 3], value[2])
    assert cache.key_value(0)[0].abs().sum() == 0  # other layers untouched


def test_host_round_trip_into_other_blocks() -> None:
    cache = _cache()
    cache.data.normal_()
    host = cache.copy_to_host([6, 1])
    assert host.shape == (3, 2, 2, 4, 2, 5) and host.device.type == "cpu"
    assert torch.equal(host[:, :, 0], cache.data[:, :, 6])
    other = _cache()
    other.load_from_host([0, 7], host)
    assert torch.equal(other.data[:, :, 0], cache.data[:, :, 6])
    assert torch.equal(other.data[:, :, 7], cache.data[:, :, 1])
    with pytest.raises(InvalidArgument):
        other.load_from_host([0], host)  # shape says two blocks


def test_block_ids_are_checked() -> None:
    cache = _cache()
    with pytest.raises(InvalidArgument):
        cache.copy_to_host([8])
    with pytest.raises(InvalidArgument):
        cache.load_from_host([-1], cache.copy_to_host([0]))


def test_num_blocks_for_memory() -> None:
    shape = {"num_layers": 30, "block_size": 16, "num_kv_heads": 3, "head_dim": 64}
    per_block = KVCacheTensors.bytes_per_block(**shape, dtype=torch.bfloat16)
    assert per_block == 30 * 2 * 16 * 3 * 64 * 2
    assert (
        KVCacheTensors.num_blocks_for_memory(10 * per_block + 1, **shape, dtype=torch.bfloat16)
        == 10
    )
    assert KVCacheTensors.num_blocks_for_memory(per_block - 1, **shape, dtype=torch.bfloat16) == 0


def _resident_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_a_cpu_cache_reads_zero_and_takes_memory_only_as_blocks_are_written() -> None:
    before = _resident_kib()
    kv = KVCacheTensors(
        num_layers=4,
        num_blocks=4096,
        block_size=16,
        num_kv_heads=4,
        head_dim=64,
        dtype=torch.float32,
        device="cpu",
    )  # 256 MiB
    assert _resident_kib() - before < 32 * 1024  # not written at start-up
    assert kv.data.is_contiguous() and kv.data.dtype == torch.float32
    assert float(kv.data[3, 1, 4095].abs().sum()) == 0.0  # reads as zeros, never written
    kv.data[0, 0, 7].fill_(2.0)
    assert float(kv.data[0, 0, 7].sum()) == 2.0 * 16 * 4 * 64
    assert float(kv.data[0, 0, 8].abs().sum()) == 0.0
