"""A process-wide cache of tokenizers by model directory.

Loading SmolLM2's tokenizer takes ~0.1 s of CPU and holds the GIL (the Rust loader does not
release it), which is most of what a model load costs once the weights are mapped from a DRAM
copy. Warm pods therefore load the tokenizers of the models likely to scale ahead of time, and a
pod that loads a model again reuses the one it has. Entries are keyed by the tokenizer file's
real path, size and modification time, so a DRAM copy (whose files link to the model's) and the
model directory share one entry, and a changed file is read again.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path

from deepserve.tokenizer.hf_tokenizer import TOKENIZER_FILE, Tokenizer

_Key = tuple[str, int, int]


def _key(model_dir: Path) -> _Key:
    path = os.path.realpath(model_dir / TOKENIZER_FILE)
    stat = os.stat(path)
    return path, stat.st_size, stat.st_mtime_ns


class TokenizerCache:
    """Tokenizers by model directory; concurrent requests for one share a single load."""

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[_Key, Future[Tokenizer]] = OrderedDict()

    def get(self, model_dir: str | Path) -> Tokenizer:
        """The directory's tokenizer, loaded now unless cached or being loaded."""
        try:
            key = _key(Path(model_dir))
        except OSError:
            return Tokenizer.from_model_dir(model_dir)  # raises the loader's clear error
        with self._lock:
            future = self._entries.get(key)
            owner = future is None
            if future is None:
                future = self._entries[key] = Future()
                while len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
            else:
                self._entries.move_to_end(key)
        if owner:
            try:
                future.set_result(Tokenizer.from_model_dir(model_dir))
            except BaseException as exc:
                with self._lock:
                    if self._entries.get(key) is future:
                        del self._entries[key]  # a later call tries again
                future.set_exception(exc)
        return future.result()

    def contains(self, model_dir: str | Path) -> bool:
        """Whether the tokenizer is loaded (not merely being loaded)."""
        try:
            key = _key(Path(model_dir))
        except OSError:
            return False
        with self._lock:
            future = self._entries.get(key)
        return future is not None and future.done() and future.exception() is None

    def preload(self, model_dirs: Iterable[str | Path]) -> list[Path]:
        """Loads each directory's tokenizer; returns those now cached (failures are skipped)."""
        loaded = []
        for model_dir in model_dirs:
            try:
                self.get(model_dir)
            except Exception:  # a preload is a hint: the real load reports the error
                continue
            loaded.append(Path(model_dir))
        return loaded


# The one cache of this process (a pod serves one model at a time but keeps its tokenizers).
shared_tokenizers = TokenizerCache()
