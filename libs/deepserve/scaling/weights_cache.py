"""Where a host keeps pre-loaded model weights in shared memory (DRAM pre-loading), torch-free.

One folder per (model, dtype, tensor-parallel size) under the cache root (by default on the
host's tmpfs, /dev/shm), holding each rank's prepared weights as one file that instances map,
plus links to the model's small files (config, tokenizer), so the folder is itself a model
directory. The manifest is written last and the folder appears by one rename, so a reader sees
a complete copy or none. Every instance of the model on the host maps the same files: one copy.

    <root>/<entry>/deepserve-prepared.json      manifest: model, source dir, dtype, ranks
    <root>/<entry>/rank0-of-1.weights           [header length][JSON header][aligned tensors]
    <root>/<entry>/config.json -> <model dir>/config.json   (and the tokenizer files)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "deepserve-prepared.json"
DEFAULT_ROOT = Path("/dev/shm/deepserve-weights")
_TMP_PREFIX = ".tmp-"


def rank_file_name(rank: int, tp_size: int) -> str:
    return f"rank{rank}-of-{tp_size}.weights"


def model_fingerprint(model_dir: Path) -> str:
    """Changes when the model's weight files change (path, sizes, modification times)."""
    digest = hashlib.sha256(str(model_dir.resolve()).encode())
    for path in sorted(model_dir.glob("*.safetensors")):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def entry_name(model_dir: Path, dtype: str, tp_size: int) -> str:
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_dir.resolve().name)[:40]
    return f"{readable}-{model_fingerprint(model_dir)}-{dtype}-tp{tp_size}"


@dataclass(frozen=True, slots=True)
class WeightsEntry:
    """One complete prepared copy on this host."""

    path: Path
    model: str
    source_dir: str
    dtype: str
    tp_size: int
    nbytes: int
    created_at: float
    # How it got here: "preload" (podpool) or "fork" (streamed from a running instance).
    origin: str

    def rank_path(self, rank: int) -> Path:
        return self.path / rank_file_name(rank, self.tp_size)


def read_entry(path: Path) -> WeightsEntry | None:
    """The entry at `path`, or None when it is not a complete prepared copy."""
    try:
        meta = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return WeightsEntry(
        path=path,
        model=str(meta.get("model", "")),
        source_dir=str(meta.get("source_dir", "")),
        dtype=str(meta.get("dtype", "")),
        tp_size=int(meta.get("tp_size", 1)),
        nbytes=int(meta.get("nbytes", 0)),
        created_at=float(meta.get("created_at", 0.0)),
        origin=str(meta.get("origin", "")),
    )


def is_prepared_dir(path: Path) -> bool:
    return (path / MANIFEST).is_file()


class WeightsCacheLayout:
    """The cache root of one host: find, list, create and remove prepared copies."""

    def __init__(self, root: Path = DEFAULT_ROOT) -> None:
        self.root = root

    def entry_path(self, model_dir: Path, dtype: str, tp_size: int) -> Path:
        return self.root / entry_name(model_dir, dtype, tp_size)

    def find(self, model_dir: Path, dtype: str, tp_size: int) -> WeightsEntry | None:
        return read_entry(self.entry_path(model_dir, dtype, tp_size))

    def find_any(self, model_dir: Path, tp_size: int) -> WeightsEntry | None:
        """A copy of the model at this tp size in any dtype (for callers that know no torch)."""
        source = str(model_dir.resolve())
        for entry in self.entries():
            if entry.source_dir == source and entry.tp_size == tp_size:
                return entry
        return None

    def entries(self) -> list[WeightsEntry]:
        if not self.root.is_dir():
            return []
        found = []
        for path in sorted(self.root.iterdir()):
            if path.name.startswith(_TMP_PREFIX):
                continue
            entry = read_entry(path)
            if entry is not None:
                found.append(entry)
        return found

    def new_staging_dir(self) -> Path:
        """A private folder to build a copy in; `publish` moves it into place."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        path.mkdir()
        return path

    def publish(
        self,
        staging: Path,
        *,
        model: str,
        model_dir: Path,
        dtype: str,
        tp_size: int,
        nbytes: int,
        origin: str,
    ) -> WeightsEntry:
        """Links the model's small files, writes the manifest, renames into place.

        When another writer published the same copy first, this one is discarded and the
        existing copy returned (first writer wins; both are complete and equal).
        """
        for item in model_dir.iterdir():
            if item.is_file() and item.suffix != ".safetensors" and item.name != MANIFEST:
                with contextlib.suppress(FileExistsError):
                    os.symlink(item.resolve(), staging / item.name)
        manifest = {
            "format": 1,
            "model": model,
            "source_dir": str(model_dir.resolve()),
            "dtype": dtype,
            "tp_size": tp_size,
            "nbytes": nbytes,
            "created_at": time.time(),
            "origin": origin,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest))
        final = self.entry_path(model_dir, dtype, tp_size)
        try:
            os.rename(staging, final)
        except OSError:
            # The target exists (a concurrent writer won); keep theirs.
            shutil.rmtree(staging, ignore_errors=True)
        entry = read_entry(final)
        assert entry is not None
        return entry

    def remove(self, entry: WeightsEntry) -> None:
        """Deletes a copy; instances that mapped it keep their pages until they unmap."""
        shutil.rmtree(entry.path, ignore_errors=True)

    def sweep_staging(self, older_than_s: float = 600.0) -> None:
        """Removes half-built copies of writers that died."""
        if not self.root.is_dir():
            return
        cutoff = time.time() - older_than_s
        for path in self.root.glob(f"{_TMP_PREFIX}*"):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    shutil.rmtree(path, ignore_errors=True)
