"""Fast scaling records shared by jobmgr, podpool, flowserve and the gateway (paper section 4)."""

from deepserve.scaling.demand import DemandRecord, demands
from deepserve.scaling.kv_profile import KVProfile, KVProfileStore
from deepserve.scaling.timeline import ScaleStep, ScaleTimeline, StepTiming, WeightsSource

__all__ = [
    "DemandRecord",
    "KVProfile",
    "KVProfileStore",
    "ScaleStep",
    "ScaleTimeline",
    "StepTiming",
    "WeightsSource",
    "demands",
]
