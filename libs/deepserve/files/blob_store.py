"""Where file bytes live: content-addressed blobs plus named artifacts (checkpoints, datasets).

`FileStore` is the interface; `LocalFileStore` keeps everything under one directory that every
process of a local cluster shares. An S3-compatible store would map blobs to
`blobs/<sha256>` objects and artifacts to their names, behind the same methods.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Protocol

from deepserve.errors import InvalidArgument, NotFound


def default_files_root() -> Path:
    return Path.home() / ".deepserve" / "files"


class FileStore(Protocol):
    """Blob and artifact storage; blobs are named by the SHA-256 of their bytes."""

    def put_blob(self, data: bytes) -> str: ...

    def get_blob(self, digest: str) -> bytes: ...

    def delete_blob(self, digest: str) -> None: ...

    def put_artifact(self, name: str, data: bytes) -> None: ...

    def get_artifact(self, name: str) -> bytes: ...

    def has_artifact(self, name: str) -> bool: ...

    def delete_artifacts(self, prefix: str) -> None: ...


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a reader never sees half a file (and a crash leaves no partial one).
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LocalFileStore:
    """A FileStore in a local directory: blobs/<ab>/<sha256>, artifacts/<name>."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or default_files_root()).expanduser()

    def _blob_path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise InvalidArgument(f"not a sha256 digest: {digest!r}", field="digest")
        return self.root / "blobs" / digest[:2] / digest

    def artifact_path(self, name: str) -> Path:
        """The local path of an artifact (for consumers that need a real file)."""
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts:
            raise InvalidArgument(f"bad artifact name {name!r}", field="name")
        return self.root / "artifacts" / name

    def put_blob(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        path = self._blob_path(digest)
        if not path.exists():  # same bytes, same blob: uploading twice stores once
            _atomic_write(path, data)
        return digest

    def get_blob(self, digest: str) -> bytes:
        try:
            return self._blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is missing from {self.root}") from None

    def delete_blob(self, digest: str) -> None:
        self._blob_path(digest).unlink(missing_ok=True)

    def put_artifact(self, name: str, data: bytes) -> None:
        _atomic_write(self.artifact_path(name), data)

    def get_artifact(self, name: str) -> bytes:
        try:
            return self.artifact_path(name).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"artifact {name} is missing from {self.root}") from None

    def has_artifact(self, name: str) -> bool:
        return self.artifact_path(name).is_file()

    def delete_artifacts(self, prefix: str) -> None:
        base = self.artifact_path(prefix)
        if base.is_file():
            base.unlink()
            return
        if base.is_dir():
            for path in sorted(base.rglob("*"), reverse=True):
                path.rmdir() if path.is_dir() else path.unlink()
            base.rmdir()
