"""Each service installs alone: a fresh virtual environment holding deepserve-libs and one service,
built as wheels from the working tree and nothing else, imports every module of the service,
holds no other service and (all but flowserve) no torch, and its entry point serves and stops.

Starts real processes: etcd and valkey-server (session fixtures), then each service
(`<venv>/bin/python -m deepserve.<name>`) from its own environment. The environments are built
with uv (dev group) through its default cache, so a warm run links packages instead of fetching
them; uv is pointed at the indexes and find-links pip is configured with, so the flowserve
environment gets the same CPU build of torch as the development environment.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from deepserve import records
from deepserve.processes import ManagedProcess, free_port
from deepserve.rpc.health_check import wait_serving
from deepserve.store.etcd import EtcdStore

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("gateway", "jobmgr", "scheduler", "podpool", "flowserve")
# Only the engine carries torch; the control plane must install and run without it.
WITH_TORCH = {"flowserve"}
TORCH_VERSION = "2.13.0+cpu"
# The other portions of the namespace a single-service environment must not hold.
APPS = ("cli", "cluster")

# Run inside a unit's environment: import every module of the service, report what it holds.
PROBE = """
import importlib, importlib.metadata as md, importlib.util, json, pkgutil, sys
name, others = sys.argv[1], sys.argv[2:]
failed = {}
package = importlib.import_module(f"deepserve.{name}")
def record(module):
    failed.setdefault(module, repr(sys.exc_info()[1]))
for info in pkgutil.walk_packages(package.__path__, f"deepserve.{name}.", onerror=record):
    if info.name.endswith(".__main__"):
        continue  # importing it runs the service
    try:
        importlib.import_module(info.name)
    except Exception as exc:
        failed[info.name] = f"{type(exc).__name__}: {exc}"
dists = sorted(d.metadata["Name"].lower() for d in md.distributions())
print(json.dumps({
    "failed": failed,
    "namespace_paths": list(importlib.import_module("deepserve").__path__),
    "present": [o for o in others if importlib.util.find_spec(f"deepserve.{o}") is not None],
    "torch": importlib.util.find_spec("torch") is not None,
    "torch_version": md.version("torch") if "torch" in dists else None,
    "deepserve_dists": [d for d in dists if d.startswith("deepserve")],
    "cuda_dists": [d for d in dists if d.startswith("nvidia-")],
}))
"""


def uv_binary() -> str:
    beside = Path(sys.executable).parent / "uv"
    found = str(beside) if beside.exists() else shutil.which("uv")
    if not found:
        pytest.fail("uv not installed: the dev group ships it")
    return found


def pip_settings() -> dict[str, str]:
    """pip's effective settings (`pip config list`: config files and PIP_* variables), by option.

    Environment variables win over the install section, which wins over the global one: pip's order.
    """
    done = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60
    )
    by_section: dict[str, dict[str, str]] = {}
    for line in done.stdout.splitlines():
        match = re.fullmatch(r"([^.=]*)\.([\w-]+)='(.*)'", line.strip())
        if match:
            section, option, value = match.groups()
            by_section.setdefault(section, {})[option] = value
    settings: dict[str, str] = {}
    for section in ("global", "install", ":env:"):
        settings.update(by_section.get(section, {}))
    return settings


def uv_index_args(pip: dict[str, str]) -> list[str]:
    """uv options that find packages where pip does: uv reads neither pip.conf nor PIP_* variables.

    pip takes the best version across all indexes and find-links (so the local `+cpu` torch
    wheel beats PyPI's CUDA build of the same version); `unsafe-best-match` is that rule in uv.
    """
    args = ["--index-strategy", "unsafe-best-match"]
    if "index-url" in pip:
        args += ["--default-index", pip["index-url"]]
    for url in pip.get("extra-index-url", "").split():
        args += ["--index", url]
    for location in pip.get("find-links", "").split():
        args += ["--find-links", location]
    if pip.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        args.append("--no-index")
    return args


def uv_environment(pip: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    # The interpreter running the tests; never a downloaded one.
    env.setdefault("UV_PYTHON_DOWNLOADS", "never")
    if "cert" in pip:
        env.setdefault("SSL_CERT_FILE", pip["cert"])
    return env


@dataclass
class UnitEnv:
    """One service's fresh virtual environment and what it holds, or why it could not be built."""

    name: str
    python: Path
    build_s: float = 0.0
    probe_s: float = 0.0
    # The PROBE's report: modules that failed to import, namespace paths, distributions, torch.
    probe: dict[str, Any] = field(default_factory=dict)
    error: str = ""


class UnitInstaller:
    """Builds the units' wheels once, then one environment per service, concurrently."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uv = uv_binary()
        pip = pip_settings()
        self.index_args = uv_index_args(pip)
        self.constraints = [a for c in pip.get("constraint", "").split() for a in ("-c", c)]
        self.env = uv_environment(pip)
        # One install at a time: concurrent `uv pip install`s wait on each other in the shared
        # cache (five at once took ~13 s each here, one after another ~1.7 s each).
        self.install_lock = threading.Lock()

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.uv, *args], capture_output=True, text=True, env=self.env, timeout=600
        )

    def build_wheel(self, unit: str, out_dir: Path) -> Path:
        # Built from the working tree each run: uv's cache would reuse a wheel of an unchanged
        # pyproject.toml even after the code changed.
        done = self.run(
            "build", "--wheel", "--quiet", "--out-dir", str(out_dir), *self.index_args,
            str(self.root / unit),
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"uv build {unit} failed:\n{done.stderr}")
        dist = "deepserve_" + Path(unit).name.replace("-", "_")
        (wheel,) = out_dir.glob(f"{dist}-*.whl")
        return wheel

    def build_env(self, name: str, wheels: list[Path], venv: Path) -> UnitEnv:
        """A fresh environment with only these wheels (and their dependencies), then probed."""
        env = UnitEnv(name, venv / "bin" / "python")
        steps = [
            ("venv", "--quiet", "--python", sys.executable, str(venv)),
            ("pip", "install", "--python", str(env.python), *self.index_args, *self.constraints,
             *map(str, wheels)),
        ]  # fmt: skip
        with self.install_lock:
            started = time.monotonic()
            for step in steps:
                done = self.run(*step)
                if done.returncode != 0:
                    env.error = f"uv {' '.join(step[:2])} failed:\n{done.stderr}"
                    return env
            env.build_s = time.monotonic() - started
        started = time.monotonic()
        # Probed here, while the next environment installs, rather than one test at a time.
        others = [s for s in SERVICES if s != name] + list(APPS)
        done = subprocess.run(
            [str(env.python), "-c", PROBE, name, *others],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=venv,  # not the repository: nothing of the working tree on sys.path
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        )
        env.probe_s = time.monotonic() - started
        if done.returncode != 0:
            env.error = f"the probe failed:\n{done.stderr}"
        else:
            env.probe = json.loads(done.stdout.splitlines()[-1])
        return env


def selected_services(request: pytest.FixtureRequest) -> list[str]:
    """The services this session's selected tests ask for (all when run as a whole)."""
    wanted = set()
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if item.path == Path(__file__) and callspec is not None and "service" in callspec.params:
            wanted.add(callspec.params["service"])
    return [s for s in SERVICES if s in wanted] or list(SERVICES)


@pytest.fixture(scope="module")
def installer() -> UnitInstaller:
    return UnitInstaller(ROOT)


@pytest.fixture(scope="module")
def unit_wheels(
    installer: UnitInstaller, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wheels")
    units = {"libs": "libs", **{s: f"services/{s}" for s in SERVICES}}
    with ThreadPoolExecutor(len(units)) as pool:
        futures = {k: pool.submit(installer.build_wheel, u, out) for k, u in units.items()}
        return {k: f.result() for k, f in futures.items()}


@pytest.fixture(scope="module")
def unit_envs(
    request: pytest.FixtureRequest,
    installer: UnitInstaller,
    unit_wheels: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Future[UnitEnv]]]:
    root = tmp_path_factory.mktemp("venvs")
    started = time.monotonic()
    with ThreadPoolExecutor(len(SERVICES)) as pool:
        envs = {
            s: pool.submit(installer.build_env, s, [unit_wheels["libs"], unit_wheels[s]], root / s)
            for s in sorted(selected_services(request), key=lambda s: s not in WITH_TORCH)
        }
        yield envs
    built = [f.result() for f in envs.values()]
    print(
        f"\n[unit installs] {len(built)} environments in {time.monotonic() - started:.1f}s wall: "
        + ", ".join(f"{e.name} {e.build_s:.1f}s + probe {e.probe_s:.1f}s" for e in built)
    )


def unit_env(envs: dict[str, Future[UnitEnv]], service: str) -> UnitEnv:
    env = envs[service].result()
    if env.error:
        pytest.fail(f"the {service} environment: {env.error}")
    return env


def test_each_unit_wheel_holds_only_its_own_package(unit_wheels: dict[str, Path]) -> None:
    for unit, wheel in unit_wheels.items():
        with zipfile.ZipFile(wheel) as archive:
            files = [n for n in archive.namelist() if ".dist-info/" not in n]
        # A deepserve/__init__.py in any unit would shadow the other portions of the namespace.
        assert "deepserve/__init__.py" not in files, wheel.name
        if unit == "libs":
            assert "deepserve/config.py" in files
            assert not [f for f in files if f.split("/")[1] in (*SERVICES, *APPS)], wheel.name
        else:
            assert f"deepserve/{unit}/__main__.py" in files, wheel.name
            assert all(f.startswith(f"deepserve/{unit}/") for f in files), wheel.name


@pytest.mark.parametrize("service", SERVICES)
def test_service_environment_holds_only_its_declared_dependencies(
    service: str, unit_envs: dict[str, Future[UnitEnv]]
) -> None:
    env = unit_env(unit_envs, service)
    found = env.probe
    # Every module of the service imports with only what its unit declares.
    assert found["failed"] == {}
    # Installed from the wheels (not editable): every portion of the namespace is in the venv.
    venv = env.python.parent.parent
    assert all(Path(p).is_relative_to(venv) for p in found["namespace_paths"]), found
    assert found["deepserve_dists"] == sorted(["deepserve-libs", f"deepserve-{service}"])
    assert found["present"] == [], f"other units in the {service} environment"
    if service in WITH_TORCH:
        assert found["torch"] and found["torch_version"] == TORCH_VERSION, found
        assert found["cuda_dists"] == []
    else:
        assert not found["torch"], f"{service} pulls torch in"


def service_env(service: str, etcd_endpoint: str, redis_url: str, tmp: Path) -> dict[str, str]:
    name = service.upper()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        {
            "DEEPSERVE_ETCD_ENDPOINT": etcd_endpoint,
            "DEEPSERVE_REDIS_URL": redis_url,
            "DEEPSERVE_LEASE_TTL_S": "2",
            f"DEEPSERVE_{name}_GRPC_PORT": str(free_port()),
            f"DEEPSERVE_{name}_METRICS_PORT": "0",
            # Nothing of this run outside its temporary folder.
            "DEEPSERVE_FILES_ROOT": str(tmp / "files"),
            "DEEPSERVE_MODEL_CACHE": str(tmp / "models"),
            # Peers that are not there: the service must start and stop without them.
            "DEEPSERVE_GATEWAY_HTTP_PORT": str(free_port()),
            "DEEPSERVE_GATEWAY_SCHEDULER_ADDRESS": f"127.0.0.1:{free_port()}",
            "DEEPSERVE_JOBMGR_PODPOOL_ADDRESS": f"127.0.0.1:{free_port()}",
            "DEEPSERVE_PODPOOL_WARM_PODS": "0",
            "DEEPSERVE_PODPOOL_WEIGHTS_CACHE_DIR": str(tmp / "weights"),
            # A warm pod: runtime up, no model.
            "DEEPSERVE_FLOWSERVE_MODEL": "",
            "DEEPSERVE_FLOWSERVE_THREADS": "1",
            "DEEPSERVE_FLOWSERVE_WEIGHTS_CACHE_DIR": str(tmp / "weights"),
        }
    )
    return env


async def registered_pids(etcd_endpoint: str, service: str) -> set[int]:
    """The processes holding a service record (registered under a live lease) for `service`."""
    async with EtcdStore(etcd_endpoint) as store:
        found, _ = await records.services(store, service).list()
    return {v.record.pid for v in found}


async def wait_registered(etcd_endpoint: str, service: str, pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pid in await registered_pids(etcd_endpoint, service):
            return True
        await asyncio.sleep(0.1)
    return False


@pytest.mark.parametrize("service", SERVICES)
async def test_service_entry_point_serves_and_stops_cleanly(
    service: str,
    unit_envs: dict[str, Future[UnitEnv]],
    etcd_endpoint: str,
    redis_url: str,
    tmp_path: Path,
) -> None:
    env = unit_env(unit_envs, service)
    environ = service_env(service, etcd_endpoint, redis_url, tmp_path)
    port = environ[f"DEEPSERVE_{service.upper()}_GRPC_PORT"]
    proc = ManagedProcess(
        service,
        [str(env.python), "-m", f"deepserve.{service}"],
        tmp_path / f"{service}.log",
        env=environ,
        cwd=tmp_path,
    ).start()
    try:
        serving = await wait_serving(f"127.0.0.1:{port}", 90)
        assert serving, f"{service} never reported SERVING:\n{proc.tail()}"
        # Health turns SERVING before the service registers and installs its SIGTERM handler
        # (ServiceRuntime.serve); a SIGTERM in between kills it uncleanly. Its record in etcd
        # means it got that far.
        registered = await wait_registered(etcd_endpoint, service, proc.pid, 30)
        assert registered, f"{service} never registered in etcd:\n{proc.tail()}"
    finally:
        returncode = proc.stop(timeout_s=30)
    assert returncode == 0, f"{service} exited with {returncode} after SIGTERM:\n{proc.tail()}"
    # A clean stop revokes the lease: nothing of the process is left in etcd.
    assert proc.pid not in await registered_pids(etcd_endpoint, service)
