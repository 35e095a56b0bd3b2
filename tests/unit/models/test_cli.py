from pathlib import Path

import pytest

from deepserve.cli.models import main


def test_list_shows_pull_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--cache-dir", str(tmp_path), "list"]) == 0
    assert capsys.readouterr().out.startswith("smollm2-135m\tnot pulled\tApache-2.0")
    (tmp_path / "smollm2-135m").mkdir()
    (tmp_path / "smollm2-135m" / "config.json").write_text("{}")
    assert main(["--cache-dir", str(tmp_path), "list"]) == 0
    assert capsys.readouterr().out.startswith("smollm2-135m\tpulled\t")


def test_path_of_unpulled_model_fails_with_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--cache-dir", str(tmp_path), "path", "smollm2-135m"]) == 1
    assert "deepserve models pull smollm2-135m" in capsys.readouterr().err


def test_path_of_pulled_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "smollm2-135m").mkdir()
    (tmp_path / "smollm2-135m" / "config.json").write_text("{}")
    assert main(["--cache-dir", str(tmp_path), "path", "smollm2-135m"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "smollm2-135m")
