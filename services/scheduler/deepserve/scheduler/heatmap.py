"""The PD-aware heatmap: where disaggregating prefill from decode beats colocating them.

Rows are prompt-length buckets, columns decode/prompt-ratio buckets; each cell holds the
relative gain of disaggregation for requests of that shape, and the router disaggregates when
the gain exceeds the heatmap's threshold. Long prompts with short outputs gain most: their
prefill would stall every decode running beside it on a colocated instance, and their decode
is too short to amortise anything else. A wrong "disaggregate" costs only the KV hand-off.

The gains come from one cost model, fed either with default figures (the shipped heatmap) or
with figures measured on the machine by `deepserve profile MODEL` (stored in etcd per model).
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import asdict, dataclass

from pydantic import BaseModel, Field

from deepserve.store.etcd import EtcdStore, TypedPrefix
from deepserve.store.keys import Keys

PROMPT_EDGES = [0, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
RATIO_EDGES = [0.0, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 2.0, 4.0]


@dataclass(frozen=True, slots=True)
class CostModel:
    """Timings that decide PD placement: measured by profiling, or these defaults."""

    prefill_s_per_token: float = 5e-5
    prefill_fixed_s: float = 0.005
    decode_step_s: float = 0.02
    kv_bytes_per_token: float = 131072.0
    transfer_bytes_per_s: float = 10e9
    handoff_s: float = 0.005
    # Decode requests that share a colocated instance with a prefill and stall behind it.
    interference_batch: float = 8.0
    # Prompt tokens that ride along in a (memory-bound) decode step at almost no cost.
    free_prefill_tokens: float = 256.0

    def disaggregation_gain(self, prompt_tokens: float, decode_tokens: float) -> float:
        """Relative saving in request-seconds when this request is disaggregated.

        Colocated, the part of the prefill a decode step cannot absorb stalls
        `interference_batch` running decodes; disaggregated, it stalls none but pays the KV
        transfer and hand-off. Long decodes dilute either effect.
        """
        prefill = self.prefill_fixed_s + self.prefill_s_per_token * prompt_tokens
        decode = self.decode_step_s * decode_tokens
        transfer = (
            self.handoff_s + self.kv_bytes_per_token * prompt_tokens / self.transfer_bytes_per_s
        )
        stall = (
            self.interference_batch
            * self.prefill_s_per_token
            * max(0.0, prompt_tokens - self.free_prefill_tokens)
        )
        colocated = prefill + stall + decode
        disaggregated = prefill + transfer + decode
        return (colocated - disaggregated) / colocated


def _representative(edges: list[float], i: int) -> float:
    """A value inside bucket i: the geometric middle (the first and last buckets extrapolate)."""
    low = edges[i]
    high = edges[i + 1] if i + 1 < len(edges) else edges[i] * 2
    if low <= 0:
        return high / 2
    return math.sqrt(low * high)


class HeatmapRecord(BaseModel):
    """A model's heatmap as stored under /deepserve/heatmaps/<model>."""

    model: str
    prompt_edges: list[int] = Field(default_factory=lambda: list(PROMPT_EDGES))
    ratio_edges: list[float] = Field(default_factory=lambda: list(RATIO_EDGES))
    # gain[row][column]: rows follow prompt_edges, columns ratio_edges.
    gain: list[list[float]]
    threshold: float = 0.15
    source: str = "default"
    measured_at: float = Field(default_factory=time.time)
    cost_model: dict[str, float] = Field(default_factory=dict)

    def gain_at(self, prompt_tokens: int, ratio: float) -> float:
        row = max(bisect.bisect_right(self.prompt_edges, prompt_tokens) - 1, 0)
        col = max(bisect.bisect_right(self.ratio_edges, ratio) - 1, 0)
        return self.gain[row][col]

    def disaggregate(self, prompt_tokens: int, ratio: float) -> tuple[bool, float]:
        gain = self.gain_at(prompt_tokens, ratio)
        return gain > self.threshold, gain

    def render(self) -> str:
        """The grid as text: D marks cells that disaggregate."""
        header = "prompt\\ratio " + " ".join(f"{r:>6.3g}" for r in self.ratio_edges)
        lines = [header]
        for edge, row in zip(self.prompt_edges, self.gain, strict=True):
            cells = " ".join(f"{g:+.2f}{'D' if g > self.threshold else ' '}" for g in row)
            lines.append(f"{edge:>12} {cells}")
        return "\n".join(lines)


def build_heatmap(
    model: str, cost: CostModel, *, source: str, threshold: float = 0.15
) -> HeatmapRecord:
    """Evaluates the cost model at the middle of every cell."""
    gain = [
        [
            round(
                cost.disaggregation_gain(
                    _representative(PROMPT_EDGES, r),
                    _representative(PROMPT_EDGES, r) * _representative(RATIO_EDGES, c),
                ),
                4,
            )
            for c in range(len(RATIO_EDGES))
        ]
        for r in range(len(PROMPT_EDGES))
    ]
    return HeatmapRecord(
        model=model, gain=gain, threshold=threshold, source=source, cost_model=asdict(cost)
    )


DEFAULT_HEATMAP = build_heatmap("*", CostModel(), source="default")


def heatmaps(store: EtcdStore) -> TypedPrefix[HeatmapRecord]:
    return TypedPrefix(store, Keys.heatmaps_prefix(), HeatmapRecord, Keys.heatmap)
