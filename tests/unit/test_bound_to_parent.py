"""`bound_to_parent`: a child that dies with the process that started it, armed without running
any Python in the forked child."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from deepserve.processes import bound_to_parent


def _gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie child of a dead parent is reaped by init; until then it is not running.
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
                return True
        except (FileNotFoundError, IndexError):
            return True
        time.sleep(0.05)
    return False


def test_the_child_becomes_its_program_with_the_same_pid(tmp_path: Path) -> None:
    out = tmp_path / "pid"
    argv = [sys.executable, "-c", f"import os; open({str(out)!r}, 'w').write(str(os.getpid()))"]
    proc = subprocess.Popen(bound_to_parent(argv))
    assert proc.wait(30) == 0
    assert int(out.read_text()) == proc.pid


def test_the_child_dies_with_its_parent_even_with_at_fork_hooks(tmp_path: Path) -> None:
    # The parent registers an after-fork hook that would crash or hang a forked child that ran
    # it (what filelock 4.3's did): with bound_to_parent no Python runs in the fork at all.
    marker = tmp_path / "hook-ran"
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, subprocess, sys, time
            from deepserve.processes import bound_to_parent
            os.register_at_fork(after_in_child=lambda: open({str(marker)!r}, "w").close())
            child = subprocess.Popen(bound_to_parent(
                [sys.executable, "-c", "import time; time.sleep(600)"]))
            print(child.pid, flush=True)
            time.sleep(600)
            """
        )
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        time.sleep(0.5)  # the child has exec'd its program
        assert not _gone(child, timeout_s=0.1)
        parent.kill()
        parent.wait(10)
        assert _gone(child), "the child outlived its parent"
        assert not marker.exists(), "an at-fork hook ran in the child"
    finally:
        if parent.poll() is None:
            parent.kill()
