"""The import fence covers every room: a new top-level module cannot slip past the layers."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SERVICES = ("gateway", "jobmgr", "scheduler", "podpool", "flowserve")


def _layers() -> list[set[str]]:
    config = configparser.ConfigParser()
    config.read(ROOT / ".importlinter")
    raw = config["importlinter:contract:layers"]["layers"]
    return [set(re.findall(r"\(([a-z_0-9]+)\)", line)) for line in raw.strip().splitlines()]


def _top_level(unit: Path) -> set[str]:
    names = set()
    for child in (unit / "deepserve").iterdir():
        if child.name.startswith(("_", ".")):
            continue
        if child.is_dir() or child.suffix == ".py":
            names.add(child.stem)
    return names


def test_every_libs_module_is_in_the_libs_layer() -> None:
    _apps, services, libs = _layers()
    assert services == set(SERVICES)
    assert _top_level(ROOT / "libs") == libs


def test_every_apps_module_is_in_the_apps_layer() -> None:
    apps, _services, _libs = _layers()
    assert _top_level(ROOT / "apps") == apps


def test_each_service_unit_holds_exactly_its_own_package() -> None:
    for service in SERVICES:
        assert _top_level(ROOT / "services" / service) == {service}


def test_no_unit_owns_the_namespace_package() -> None:
    # PEP 420: a deepserve/__init__.py in any unit would hide every other unit's modules.
    units = [ROOT / "libs", ROOT / "apps", *(ROOT / "services" / s for s in SERVICES)]
    assert not [u for u in units if (u / "deepserve" / "__init__.py").exists()]
