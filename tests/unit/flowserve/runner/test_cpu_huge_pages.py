"""Pods ask torch for transparent huge pages before torch loads, and a user's 0 wins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from deepserve.flowserve.runner.cpu_huge_pages import THP_ENV

# Allocates and touches 64 MiB, then reports the huge pages of the mapping that holds it.
ALLOCATE = """
import json
from deepserve.flowserve.runner.cpu_huge_pages import ask_for_huge_pages
ask_for_huge_pages()
import os, torch
x = torch.empty(16 << 20, dtype=torch.float32)
x.fill_(1.0)
ptr, huge_kb = x.data_ptr(), 0
with open("/proc/self/smaps") as smaps:
    inside = False
    for line in smaps:
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(v, 16) for v in head.split("-"))
            inside = start <= ptr < end
        elif inside and head == "AnonHugePages:":
            huge_kb = int(line.split()[1])
print(json.dumps({"env": os.environ.get("THP_MEM_ALLOC_ENABLE"), "huge_kb": huge_kb}))
"""


def _thp_mode() -> str:
    text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    return text[text.index("[") + 1 : text.index("]")]


def _run(code: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env=env,
    )
    return done.stdout


def _allocate(env: dict[str, str]) -> dict[str, object]:
    return json.loads(_run(ALLOCATE, env).strip().splitlines()[-1])


def _env_without_thp() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != THP_ENV}


def test_large_tensors_get_huge_pages_where_the_host_gives_them() -> None:
    result = _allocate(_env_without_thp())
    assert result["env"] == "1"
    if _thp_mode() == "never":  # the host gives none to anyone; nothing to ask for
        assert result["huge_kb"] == 0
    else:
        # At least one 2 MiB page (a host short of free huge pages may give fewer than asked).
        assert int(result["huge_kb"]) >= 2 << 10


def test_a_zero_in_the_environment_keeps_them_off() -> None:
    result = _allocate({**_env_without_thp(), THP_ENV: "0"})
    assert result["env"] == "0"
    if _thp_mode() != "always":  # "always" gives them without asking
        assert result["huge_kb"] == 0


def test_the_zygote_asks_before_it_loads_torch() -> None:
    probe = (
        "import os, sys\n"
        "import deepserve.flowserve.pod.zygote as zygote\n"
        "def preload():\n"
        "    print(os.environ.get('THP_MEM_ALLOC_ENABLE'), 'torch' in sys.modules)\n"
        "    raise SystemExit(0)\n"
        "zygote._preload = preload\n"
        "zygote.serve()\n"
    )
    assert _run(probe, _env_without_thp()).split() == ["1", "False"]
