"""What a pod's environment carries from podpool's settings: OpenMP spinning, CPU threads and
the models whose tokenizers it preloads; an operator's own OpenMP settings win."""

from __future__ import annotations

import pytest

from deepserve.config import PodPoolSettings
from deepserve.podpool.local_backend import LocalProcessBackend


def test_pod_env_carries_threads_spin_count_and_preloads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    settings = PodPoolSettings(pod_threads=1, dram_models="smollm2-135m", pod_log_dir=tmp_path)  # type: ignore[call-arg]
    env = LocalProcessBackend(settings).pod_env("pod-a")
    assert env["GOMP_SPINCOUNT"] == "20000"
    assert env["DEEPSERVE_FLOWSERVE_THREADS"] == "1"
    assert env["DEEPSERVE_FLOWSERVE_PRELOAD_TOKENIZERS"] == "smollm2-135m"
    defaults = LocalProcessBackend(PodPoolSettings(pod_log_dir=tmp_path)).pod_env("pod-b")  # type: ignore[call-arg]
    assert "DEEPSERVE_FLOWSERVE_THREADS" not in defaults
    assert "DEEPSERVE_FLOWSERVE_PRELOAD_TOKENIZERS" not in defaults


def test_an_operators_openmp_setting_is_left_alone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    env = LocalProcessBackend(PodPoolSettings(pod_log_dir=tmp_path)).pod_env("pod-a")  # type: ignore[call-arg]
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in env
    monkeypatch.delenv("OMP_WAIT_POLICY")
    off = PodPoolSettings(pod_openmp_spin_count=0, pod_log_dir=tmp_path)  # type: ignore[call-arg]
    assert "GOMP_SPINCOUNT" not in LocalProcessBackend(off).pod_env("pod-b")
