"""The pod zygote imports the pod's own modules before forking, and starts no thread doing so
(a fork copies only the calling thread: a child would inherit a half-held lock)."""

from __future__ import annotations

import json
import subprocess
import sys

from deepserve.flowserve.pod.zygote import POD_MODULES

PROBE = """
import json, sys, threading
from deepserve.flowserve.pod.zygote import POD_MODULES, _preload
_preload()
print(json.dumps({"loaded": [m for m in POD_MODULES if m in sys.modules],
                  "threads": threading.active_count()}))
"""


def test_the_zygote_preloads_the_pod_modules_without_threads() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded"] == list(POD_MODULES)
    assert result["threads"] == 1, done.stderr
    assert "not preloading" not in done.stderr
