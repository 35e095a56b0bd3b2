"""Device platform choice: argument, environment variable, automatic fallback to CPU."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from deepserve.errors import FailedPrecondition, InvalidArgument
from deepserve.flowserve.pod.engine_builder import step_token_budget
from deepserve.flowserve.runner.device import (
    DEVICE_ENV_VAR,
    DevicePlatform,
    detect_platform,
    npu_available,
    parse_dtype,
    platform_of,
)
from deepserve.flowserve.settings import FlowServeSettings


def test_auto_picks_an_available_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEVICE_ENV_VAR, raising=False)
    platform = detect_platform()
    expected = "npu" if npu_available() else "cuda" if torch.cuda.is_available() else "cpu"
    assert platform.kind == expected


def test_environment_and_argument_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEVICE_ENV_VAR, "cpu")
    platform = detect_platform()
    assert platform == DevicePlatform("cpu")
    assert platform.collective_backend == "gloo"
    assert platform.device(3) == torch.device("cpu")
    assert platform.default_dtype == torch.float32
    assert platform.default_step_token_budget == 1024
    monkeypatch.setenv(DEVICE_ENV_VAR, "tpu")
    with pytest.raises(InvalidArgument):
        detect_platform()
    assert detect_platform("cpu").kind == "cpu"  # the argument wins over the environment


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error path")
def test_unavailable_accelerator_is_a_failed_precondition() -> None:
    with pytest.raises(FailedPrecondition):
        detect_platform("cuda:0")


def test_backends_and_devices_per_kind() -> None:
    assert DevicePlatform("cuda").collective_backend == "nccl"
    assert DevicePlatform("npu").collective_backend == "hccl"
    assert DevicePlatform("cuda").device(1) == torch.device("cuda", 1)
    assert DevicePlatform("cuda", 2).device() == torch.device("cuda", 2)
    assert DevicePlatform("cuda").default_dtype == torch.bfloat16
    assert DevicePlatform("cuda").default_step_token_budget == 2048
    assert platform_of("cuda:1") == DevicePlatform("cuda", 1)


def test_parse_dtype() -> None:
    cpu = DevicePlatform("cpu")
    assert parse_dtype(None, cpu) == torch.float32
    assert parse_dtype("bf16", cpu) == torch.bfloat16
    assert parse_dtype("torch.float16", cpu) == torch.float16
    with pytest.raises(InvalidArgument):
        parse_dtype("int4", cpu)


def test_step_token_budget_is_configured_or_the_devices_default() -> None:
    assert step_token_budget(FlowServeSettings(device="cpu")) == 1024
    assert step_token_budget(FlowServeSettings(device="cpu", step_token_budget=96)) == 96
    with pytest.raises(ValidationError, match="step_token_budget"):
        FlowServeSettings(step_token_budget=-1)
