"""deepserve-libs declares the grpcio and protobuf its generated code (deepserve/v1) runs on.

The generated modules refuse an older grpcio than the grpcio-tools that wrote them and an older
protobuf than their gencode version, so the declared floors must follow each regeneration.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[3]
GENERATED = ROOT / "libs" / "deepserve" / "v1"


def requirements(deps: list[str]) -> dict[str, Requirement]:
    return {(r := Requirement(d)).name: r for d in deps}


def floor(req: Requirement) -> Version:
    floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==")]
    assert floors, f"{req} has no lower bound"
    return max(floors)


def generated_grpc_versions() -> set[Version]:
    pattern = re.compile(r"^GRPC_GENERATED_VERSION = '([\d.]+)'$", re.M)
    return {
        Version(v) for f in GENERATED.glob("*_pb2_grpc.py") for v in pattern.findall(f.read_text())
    }


def generated_protobuf_versions() -> set[Version]:
    pattern = re.compile(
        r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),"
    )
    return {
        Version(".".join(m))
        for f in GENERATED.glob("*_pb2.py")
        for m in pattern.findall(f.read_text())
    }


def libs_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "libs" / "pyproject.toml").read_text())["project"]
    return requirements(project["dependencies"])


def test_grpcio_floor_admits_no_release_older_than_the_generated_code() -> None:
    generated = generated_grpc_versions()
    assert generated, "no generated *_pb2_grpc.py found"
    libs = libs_requirements()
    for name in ("grpcio", "grpcio-health-checking", "grpcio-reflection"):
        assert floor(libs[name]) >= max(generated), f"{libs[name]} vs generated {max(generated)}"


def test_protobuf_range_admits_no_release_the_generated_code_refuses() -> None:
    generated = generated_protobuf_versions()
    assert generated, "no generated *_pb2.py found"
    protobuf = libs_requirements()["protobuf"]
    assert floor(protobuf) >= max(generated)
    # The runtime must share the gencode's major version.
    assert not protobuf.specifier.contains(f"{max(generated).major + 1}.0.0")


def test_dev_group_pins_the_grpcio_tools_that_wrote_the_generated_code() -> None:
    # `gen_protos.py --check` compares byte for byte: another grpcio-tools writes other code.
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["dependency-groups"]["dev"]
    tools = requirements(dev)["grpcio-tools"]
    assert [s.operator for s in tools.specifier] == ["=="]
    assert {floor(tools)} == generated_grpc_versions()
