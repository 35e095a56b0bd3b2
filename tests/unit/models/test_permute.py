import numpy as np
import pytest

from deepserve.models.gguf_convert import llama_cpp_permute, undo_llama_cpp_permute
from tests.unit.models.tiny_gguf import llama_cpp_permute as reference_permute


@pytest.mark.parametrize(
    ("n_head", "head_dim", "cols"),
    [(1, 2, 3), (4, 16, 64), (9, 64, 576), (3, 64, 576), (2, 8, 1), (8, 32, 5)],
)
def test_undo_inverts_llama_cpp_permute(n_head: int, head_dim: int, cols: int) -> None:
    weight = np.random.default_rng(n_head).standard_normal((n_head * head_dim, cols))
    permuted = reference_permute(weight, n_head)
    assert not np.array_equal(permuted, weight) or head_dim == 2
    np.testing.assert_array_equal(undo_llama_cpp_permute(permuted, n_head), weight)
    np.testing.assert_array_equal(llama_cpp_permute(weight, n_head), permuted)


def test_gqa_k_projection_uses_kv_head_count() -> None:
    # k_proj of 2 kv heads x 16 dims (4 query heads); undoing it with the query head count is wrong.
    weight = np.random.default_rng(0).standard_normal((2 * 16, 64))
    permuted = reference_permute(weight, 2)
    np.testing.assert_array_equal(undo_llama_cpp_permute(permuted, 2), weight)
    assert not np.array_equal(undo_llama_cpp_permute(permuted, 4), weight)


def test_rows_that_do_not_split_into_head_pairs_are_refused() -> None:
    with pytest.raises(ValueError, match="192 rows"):
        undo_llama_cpp_permute(np.zeros((192, 4)), 9)


def test_permute_pairs_rotary_halves_on_adjacent_rows() -> None:
    # One head of dim 4: HF rows (0, 1 | 2, 3) rotate as pairs (0, 2) and (1, 3); llama.cpp
    # stores those pairs adjacent.
    weight = np.arange(4, dtype=np.float32).reshape(4, 1)
    assert reference_permute(weight, 1).ravel().tolist() == [0, 2, 1, 3]
    assert undo_llama_cpp_permute(np.array([[0], [2], [1], [3]]), 1).ravel().tolist() == [
        0,
        1,
        2,
        3,
    ]


def test_bias_shaped_vector_round_trips() -> None:
    bias = np.arange(2 * 8, dtype=np.float32)
    np.testing.assert_array_equal(undo_llama_cpp_permute(reference_permute(bias, 2), 2), bias)
