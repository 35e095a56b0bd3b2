"""Where a pod should take a new instance's weights from: podpool decides, the pod follows."""

from __future__ import annotations

from dataclasses import dataclass

from deepserve.scaling.timeline import WeightsSource


@dataclass(frozen=True, slots=True)
class WeightsPlan:
    """Where LoadModel asks the pod to take the weights from (unspecified: the pod picks)."""

    source: WeightsSource = WeightsSource.UNSPECIFIED
    # DRAM: the copy's folder on the pod's host (empty: look it up by model).
    path: str = ""
    # FORK: host:port of the running instance to stream the weights from.
    fork_from: str = ""

    def describe(self) -> str:
        if self.source == WeightsSource.FORK:
            return f"fork from {self.fork_from}"
        if self.source == WeightsSource.DRAM:
            return f"DRAM copy {self.path}" if self.path else "DRAM copy"
        return self.source.value or "pod's choice"
