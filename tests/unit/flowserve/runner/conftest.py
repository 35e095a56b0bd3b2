"""Shared fixtures: tiny random checkpoints written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.unit.flowserve.runner.tiny_models import save_tiny_model


@pytest.fixture(scope="session", autouse=True)
def _single_thread() -> None:
    # Two cores shared with other test runs; one thread also makes float results repeatable.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("llama"))
