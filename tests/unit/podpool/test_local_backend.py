"""What a pod's environment carries from podpool's settings: OpenMP spinning, CPU threads and
the models whose tokenizers it preloads; an operator's own OpenMP settings win."""

from __future__ import annotations

import pytest

from deepserve.podpool.local_backend import LocalProcessBackend
from deepserve.podpool.settings import PodPoolSettings


def test_pod_env_carries_threads_spin_count_and_preloads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    settings = PodPoolSettings(  # type: ignore[call-arg]
        pod_threads=2,
        pod_openmp_spin_count=20000,
        dram_models="smollm2-135m",
        pod_log_dir=tmp_path,
    )
    env = LocalProcessBackend(settings).pod_env("pod-a")
    assert env["GOMP_SPINCOUNT"] == "20000"
    assert env["DEEPSERVE_FLOWSERVE_THREADS"] == "2"
    assert env["DEEPSERVE_FLOWSERVE_PRELOAD_TOKENIZERS"] == "smollm2-135m"
    defaults = LocalProcessBackend(PodPoolSettings(pod_log_dir=tmp_path)).pod_env("pod-b")  # type: ignore[call-arg]
    assert "DEEPSERVE_FLOWSERVE_THREADS" not in defaults
    assert "DEEPSERVE_FLOWSERVE_PRELOAD_TOKENIZERS" not in defaults
    # OpenMP's own spinning unless asked otherwise.
    assert "GOMP_SPINCOUNT" not in defaults
    sleeping = PodPoolSettings(pod_openmp_spin_count=0, pod_log_dir=tmp_path)  # type: ignore[call-arg]
    assert LocalProcessBackend(sleeping).pod_env("pod-c")["GOMP_SPINCOUNT"] == "0"


def test_an_operators_openmp_setting_is_left_alone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    spin = PodPoolSettings(pod_openmp_spin_count=20000, pod_log_dir=tmp_path)  # type: ignore[call-arg]
    env = LocalProcessBackend(spin).pod_env("pod-a")
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in env
    monkeypatch.setenv("GOMP_SPINCOUNT", "1000")
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert LocalProcessBackend(spin).pod_env("pod-b")["GOMP_SPINCOUNT"] == "1000"
