"""bench.machine.wait_until_quiet: a measured run starts after a busy process has stopped."""

from __future__ import annotations

import subprocess
import sys

from bench.machine import busy_cores, wait_until_quiet

_SPIN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass\n"


def test_a_spinning_process_shows_as_a_busy_core() -> None:
    spinner = subprocess.Popen([sys.executable, "-c", _SPIN.format(seconds=30)])
    try:
        assert busy_cores(0.5) > 0.5
    finally:
        spinner.kill()
        spinner.wait()


def test_the_wait_lasts_until_a_spinning_process_is_done() -> None:
    spinner = subprocess.Popen([sys.executable, "-c", _SPIN.format(seconds=1.5)])
    try:
        waited = wait_until_quiet(timeout_s=30)
        assert spinner.poll() is not None, "returned while the host was still busy"
        assert waited > 0
    finally:
        spinner.kill()
        spinner.wait()
