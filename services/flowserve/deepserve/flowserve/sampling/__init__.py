"""Token sampling: request parameters (torch-free) and the batched sampler (torch).

`SamplingParams` imports without torch so the gateway can build and validate it; the torch
parts load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from deepserve.sampling_params import (
    MAX_STOP_STRINGS,
    MAX_TOP_LOGPROBS,
    FinishReason,
    SamplingParams,
)

if TYPE_CHECKING:
    from deepserve.flowserve.sampling.sampler import Sampler, SampleResult
    from deepserve.flowserve.sampling.state import SamplingState

__all__ = [
    "MAX_STOP_STRINGS",
    "MAX_TOP_LOGPROBS",
    "FinishReason",
    "SampleResult",
    "Sampler",
    "SamplingParams",
    "SamplingState",
]

_LAZY = {
    "Sampler": "deepserve.flowserve.sampling.sampler",
    "SampleResult": "deepserve.flowserve.sampling.sampler",
    "SamplingState": "deepserve.flowserve.sampling.state",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module_name), name)
