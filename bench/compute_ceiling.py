"""The arithmetic ceiling of a serving workload: no server on this host can make output tokens
faster than the host multiplies matrices.

A workload's requests fix the work: every prompt token goes through every layer once (less what
a prefix cache finds, which the workloads measured here do not share), every output token after
the first once more, and every output token through the LM head once. Counted in floating-point
operations and divided by the best rate this host reaches on the model's own matmul shapes, that
is the least time any engine needs; its output tokens over that time is the most tok/s any engine
can serve. `bench.serve_vs_vllm` prints each system's share of it, which tells whether a ratio
goal between two systems is reachable at all on this host.

Memory traffic is not counted, so the ceiling is loose where decode batches are small (weights
streamed per step); where both systems sit near it, what remains is arithmetic.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass(frozen=True, slots=True)
class DecoderShape:
    """What the FLOP count needs of a Llama-style decoder (config.json)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, model_dir: Path) -> DecoderShape:
        config = json.loads((model_dir / "config.json").read_text())
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return cls(
            hidden=hidden,
            intermediate=int(config["intermediate_size"]),
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads", heads)),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab=int(config["vocab_size"]),
        )

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(out, in) of one layer's projections: q, k, v, o, gate, up, down."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]

    def layer_flops_per_token(self) -> int:
        """Every layer's projections for one token (multiply and add count as two)."""
        return self.layers * sum(2 * out * inp for out, inp in self.linear_shapes())

    def head_flops(self) -> int:
        """The LM head for one position."""
        return 2 * self.hidden * self.vocab

    def attention_flops(self, positions: int) -> int:
        """Scores and weighted values of one query over `positions` keys, every layer."""
        return 2 * 2 * self.heads * self.head_dim * positions * self.layers


def request_flops(shape: DecoderShape, prompt: int, output: int) -> int:
    """One request: the prompt in one pass (causal attention, the LM head at its last
    position, which yields the first output token), then one pass per further output token."""
    prefill = prompt * shape.layer_flops_per_token() + shape.head_flops()
    prefill += sum(shape.attention_flops(p) for p in range(1, prompt + 1))
    decode = sum(
        shape.layer_flops_per_token() + shape.head_flops() + shape.attention_flops(prompt + j)
        for j in range(1, output)
    )
    return prefill + decode


def workload_flops(shape: DecoderShape, requests: Iterable[tuple[int, int]]) -> tuple[int, int]:
    """(FLOPs, output tokens) of (prompt tokens, output tokens) requests."""
    flops = tokens = 0
    for prompt, output in requests:
        flops += request_flops(shape, prompt, output)
        tokens += output
    return flops, tokens


def ceiling_tok_s(flops: int, output_tokens: int, rate_flops_s: float) -> float:
    """The most output tokens per second at `rate_flops_s`: all work at that rate, nothing else."""
    return output_tokens * rate_flops_s / flops


def measured_matmul_rate(
    shape: DecoderShape, dtype: torch.dtype, threads: int, rows: int = 1024, repeats: int = 20
) -> float:
    """The best FLOP/s a prefill-sized matmul reaches on the model's projections at `rows`
    tokens: torch's F.linear, and oneDNN on weights reordered for it (what FlowServe runs, and
    the faster of the two), whichever is faster. The host's speed swings, so the best of many."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        best = 0.0
        with torch.inference_mode():
            for out, inp in {*shape.linear_shapes()}:
                x = torch.randn(rows, inp, dtype=dtype)
                w = torch.randn(out, inp, dtype=dtype)
                for matmul in _matmuls(w):
                    matmul(x)  # the primitive is built on the first call
                    for _ in range(repeats):
                        start = time.perf_counter()
                        matmul(x)
                        elapsed = time.perf_counter() - start
                        best = max(best, 2 * rows * inp * out / elapsed)
        return best
    finally:
        torch.set_num_threads(previous)


def _matmuls(weight: torch.Tensor) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    matmuls: list[Callable[[torch.Tensor], torch.Tensor]] = [lambda x: F.linear(x, weight)]
    if torch.backends.mkldnn.is_available():
        try:
            reordered = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        except (RuntimeError, AttributeError):  # a build without the op, or not for this dtype
            return matmuls
        pointwise = torch.ops.mkldnn._linear_pointwise
        matmuls.append(lambda x: pointwise(x, reordered, None, "none", [], ""))
    return matmuls
