"""Engine load figures, as reported to GetStats and to the global scheduler."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of the engine's queues, KV cache occupancy and throughput."""

    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_free: int = 0
    kv_blocks_total: int = 0
    kv_blocks_cached: int = 0
    host_blocks_used: int = 0
    host_blocks_total: int = 0
    prefix_cache_hit_rate: float = 0.0
    generation_tokens_per_s: float = 0.0
    computed_tokens_per_s: float = 0.0
    num_preemptions: int = 0
    num_steps: int = 0
    # Multi-LoRA: requests per adapter id, running and waiting; adapters in device slots.
    adapters_running: dict[str, int] = field(default_factory=dict)
    adapters_waiting: dict[str, int] = field(default_factory=dict)
    adapters_resident: tuple[str, ...] = ()


class ThroughputMeter:
    """Tokens per second over a sliding time window."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()
        self._total = 0

    def add(self, num_tokens: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if num_tokens:
            self._samples.append((now, num_tokens))
            self._total += num_tokens
        self._trim(now)

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._trim(now)
        if not self._samples:
            return 0.0
        # At least a second, so one early burst does not read as a huge rate.
        span = max(now - self._samples[0][0], 1.0)
        return self._total / span

    def _trim(self, now: float) -> None:
        while self._samples and now - self._samples[0][0] > self.window_s:
            _, n = self._samples.popleft()
            self._total -= n
