"""The process-wide tokenizer cache: one load per tokenizer file, shared across directories that
link to it and across concurrent callers; a changed file or a failed load is read again."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from deepserve.errors import NotFound
from deepserve.tokenizer import Tokenizer
from deepserve.tokenizer.cache import TokenizerCache
from tests.tiny_model import make_tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tok") / "tiny")


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    loads: list[Path] = []
    real = Tokenizer.from_model_dir.__func__  # type: ignore[attr-defined]

    def counting(cls: type[Tokenizer], path: str | Path) -> Tokenizer:
        loads.append(Path(path))
        return real(cls, path)

    monkeypatch.setattr(Tokenizer, "from_model_dir", classmethod(counting))
    return loads


def test_a_linked_copy_and_concurrent_callers_share_one_load(
    model_dir: Path, tmp_path: Path, counted: list[Path]
) -> None:
    cache = TokenizerCache()
    linked = tmp_path / "dram-copy"
    linked.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        os.symlink(model_dir / name, linked / name)
    assert not cache.contains(model_dir)
    got: list[Tokenizer] = []
    threads = [
        threading.Thread(target=lambda d=d: got.append(cache.get(d)))
        for d in (model_dir, linked) * 4
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(counted) == 1
    assert len({id(t) for t in got}) == 1
    assert cache.contains(linked) and cache.contains(model_dir)
    assert got[0].encode("hello") == Tokenizer.from_model_dir(model_dir).encode("hello")


def test_a_changed_file_is_read_again(model_dir: Path, tmp_path: Path, counted: list[Path]) -> None:
    cache = TokenizerCache()
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    first = cache.get(copy)
    text = (copy / "tokenizer.json").read_text()
    (copy / "tokenizer.json").write_text(text + " ")  # same tokenizer, new size and mtime
    assert cache.get(copy) is not first
    assert len(counted) == 2


def test_a_failed_load_is_not_cached_and_preload_skips_it(
    model_dir: Path, tmp_path: Path, counted: list[Path]
) -> None:
    cache = TokenizerCache()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(Exception):  # noqa: B017 - the loader's own error type
        cache.get(broken)
    assert not cache.contains(broken)
    assert cache.preload([broken, tmp_path / "missing", model_dir]) == [model_dir]
    with pytest.raises(NotFound):
        cache.get(tmp_path / "missing")


def test_the_least_recently_used_entry_is_dropped_beyond_capacity(
    model_dir: Path, tmp_path: Path
) -> None:
    cache = TokenizerCache(capacity=2)
    copies = []
    for i in range(3):
        copy = tmp_path / f"m{i}"
        shutil.copytree(model_dir, copy)
        copies.append(copy)
        cache.get(copy)
    assert [cache.contains(c) for c in copies] == [False, True, True]
