"""The pod zygote: one process imports the pod runtime once, then forks each new pod from itself.

A pod started as a fresh process spends seconds importing torch and the engine; a pod forked
from the zygote starts with all of that already in memory, and shares those pages with the
zygote and every sibling (copy-on-write), so many warm pods fit on one host. The zygote only
imports: it starts no threads, event loop, gRPC channel or device context before forking, so
each child starts them fresh, as a new process would.

Protocol (JSON lines): the pool writes `{"pod_id", "env", "log"}` to the zygote's stdin; the
zygote forks, answers `{"pod_id", "pid"}` on stdout, and reaps children as they exit. The child
starts its own session, sends its output to `log`, takes `env` as its environment, and runs
`deepserve.flowserve.pod.main`.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
from typing import Any

from deepserve.flowserve.runner.cpu_huge_pages import ask_for_huge_pages

# The pod's own modules: imported once here instead of once per pod after the fork (what a pod
# imports before it registers warm; none of them starts a thread or a gRPC core on import).
POD_MODULES = (
    "deepserve.flowserve.pod.main",
    "deepserve.flowserve.pod.shell",
    "deepserve.flowserve.pod.startup",
    "deepserve.flowserve.pod.engine_builder",
    "deepserve.flowserve.pod.fork",
    "deepserve.flowserve.disagg.endpoint",
)


def _preload() -> None:
    import importlib
    import threading

    import torch  # noqa: F401

    for module in POD_MODULES:
        try:
            importlib.import_module(module)
        except Exception as exc:  # an optimisation: the child imports what is missing
            print(f"zygote: not preloading {module}: {exc}", file=sys.stderr, flush=True)
    if threading.active_count() > 1:  # a fork copies no threads: children would miss them
        names = [t.name for t in threading.enumerate()]
        print(f"zygote: threads started while preloading: {names}", file=sys.stderr, flush=True)


def _child(command: dict[str, Any]) -> None:
    os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    log = os.open(command["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.environ.clear()
    os.environ.update(command["env"])
    ask_for_huge_pages()  # for the processes the pod starts (tensor-parallel workers)
    from deepserve.flowserve.pod.main import main

    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _reap(*_: object) -> None:
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def serve() -> int:
    # Before torch loads: its allocator reads the setting once, and every pod inherits it.
    ask_for_huge_pages()
    _preload()
    gc.collect()
    gc.freeze()  # keep the imported objects out of the children's collections (fewer COW pages)
    signal.signal(signal.SIGCHLD, _reap)
    out = sys.stdout
    print(json.dumps({"ready": True, "pid": os.getpid()}), file=out, flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(command)
        print(json.dumps({"pod_id": command["pod_id"], "pid": pid}), file=out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(serve())
