"""deploy/Dockerfile builds each image from its own unit: read without a Docker engine, each target
copies and installs deepserve-libs, its own unit and the units its extras name, nothing else."""

from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
# Each image target and the unit it runs.
TARGETS = {
    "gateway": "services/gateway",
    "jobmgr": "services/jobmgr",
    "scheduler": "services/scheduler",
    "podpool": "services/podpool",
    "flowserve": "services/flowserve",
    "cli": "apps",
}


@dataclass
class Stage:
    """One `FROM ... AS name` stage: its base and what it copies in and runs."""

    name: str
    base: str
    copies: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    build_args: dict[str, str] = field(default_factory=dict)


def parse_stages(text: str) -> dict[str, Stage]:
    """The Dockerfile's stages by name (instructions joined across line continuations)."""
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    joined = re.sub(r"\\\n", " ", text)
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = rest.split()
            assert len(words) == 3 and words[1].upper() == "AS", f"unnamed stage: {line}"
            current = stages[words[2]] = Stage(words[2], words[0])
        elif current is not None and instruction == "COPY":
            args = [a for a in shlex.split(rest) if not a.startswith("--")]
            assert not any(a.startswith("--from") for a in shlex.split(rest)), line
            current.copies += args[:-1]
        elif current is not None and instruction == "RUN":
            current.runs.append(rest)
        elif current is not None and instruction == "ARG":
            name, _, default = rest.partition("=")
            current.build_args[name] = default
    return stages


def chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and every stage it is built on, base first."""
    found: list[Stage] = []
    while name in stages:
        found.insert(0, stages[name])
        name = stages[name].base
    return found


def pip_installed_paths(stage_chain: list[Stage]) -> list[str]:
    """The local paths (with extras) that the chain's `pip install` commands install."""
    paths = []
    for stage in stage_chain:
        for run in stage.runs:
            for command in run.split("&&"):
                words = shlex.split(command)
                if words[:2] == ["pip", "install"]:
                    paths += [w for w in words[2:] if w.startswith("./")]
    return paths


def unit_of(path: str) -> tuple[str, set[str]]:
    """`./services/podpool[local]` -> (`services/podpool`, {`local`})."""
    match = re.fullmatch(r"\./([\w/.-]+?)/?(?:\[([\w,]+)\])?", path)
    assert match, path
    return match.group(1), set(filter(None, (match.group(2) or "").split(",")))


def units_by_distribution() -> dict[str, str]:
    units = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["deepserve"]["units"]
    return {project(u)["name"]: u for u in units}


def project(unit: str) -> dict:
    return tomllib.loads((ROOT / unit / "pyproject.toml").read_text())["project"]


def unit_closure(unit: str, extras: set[str]) -> set[str]:
    """The unit and every DeepServe unit it needs, through its dependencies and these extras."""
    by_dist = units_by_distribution()
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(unit, extras)]
    while todo:
        current, chosen = todo.pop()
        if (current, frozenset(chosen)) in seen:
            continue
        seen.add((current, frozenset(chosen)))
        meta = project(current)
        requirements = list(meta.get("dependencies", []))
        for extra in chosen:
            requirements += meta.get("optional-dependencies", {})[extra]
        for line in requirements:
            req = Requirement(line)
            if req.name in by_dist:
                todo.append((by_dist[req.name], set(req.extras)))
    return {u for u, _ in seen}


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return parse_stages(DOCKERFILE.read_text())


@pytest.mark.parametrize("target", TARGETS)
def test_target_copies_and_installs_only_its_units(target: str, stages: dict[str, Stage]) -> None:
    assert target in stages, f"no `FROM ... AS {target}` in deploy/Dockerfile"
    built_on = chain(stages, target)
    installed = [unit_of(p) for p in pip_installed_paths(built_on)]
    own = [extras for unit, extras in installed if unit == TARGETS[target]]
    assert own, f"the {target} image does not install {TARGETS[target]}"
    expected = unit_closure(TARGETS[target], own[0])
    # libs, the unit and the units its chosen extras name: no other service, never the whole tree.
    assert {unit for unit, _ in installed} == expected
    copied = {c.removeprefix("./").rstrip("/") for stage in built_on for c in stage.copies}
    assert copied == expected, f"{target} copies {sorted(copied)}"


@pytest.mark.parametrize("target", TARGETS)
def test_only_images_that_need_the_engine_carry_torch(
    target: str, stages: dict[str, Stage]
) -> None:
    built_on = chain(stages, target)
    torch_runs = [run for stage in built_on for run in stage.runs if "torch" in run]
    needs_engine = "services/flowserve" in {unit_of(p)[0] for p in pip_installed_paths(built_on)}
    assert bool(torch_runs) == needs_engine
    build_args = {k: v for stage in built_on for k, v in stage.build_args.items()}
    for run in torch_runs:
        # The CPU build: PyPI's torch for x86 Linux is the CUDA one.
        words = shlex.split(run)
        index = words[words.index("--index-url") + 1]
        for name, default in build_args.items():
            index = index.replace(f"${name}", default).replace(f"${{{name}}}", default)
        assert index == "https://download.pytorch.org/whl/cpu", run


def test_unit_closure_follows_extras() -> None:
    assert unit_closure("services/gateway", set()) == {"services/gateway", "libs"}
    assert unit_closure("services/podpool", {"local"}) == {
        "services/podpool",
        "services/flowserve",
        "libs",
    }
