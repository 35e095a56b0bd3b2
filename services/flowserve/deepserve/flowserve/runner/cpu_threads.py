"""Intra-op thread counts for torch on CPU.

torch keeps the value of the last `torch.set_num_threads` call process-wide and applies it to
every thread that runs its first op afterwards. The engine loop sets 1 for itself, so a thread
started later (a second model load, a training run) would inherit 1 and run on one core. Threads
that want the machine's cores take them from here instead of inheriting.
"""

from __future__ import annotations

import torch

# Read at import, before any engine thread has lowered the process-wide value.
_STARTUP_THREADS = torch.get_num_threads()
_configured: int | None = None


def intraop_threads() -> int:
    """The thread count for compute threads (forward pass, training): configured or startup."""
    return _configured or _STARTUP_THREADS


def configure_intraop_threads(threads: int) -> None:
    """Sets the count for compute threads started from now on, and for the calling thread."""
    global _configured
    if threads < 1:
        raise ValueError("threads must be at least 1")
    _configured = threads
    torch.set_num_threads(threads)


def use_intraop_threads() -> None:
    """Gives the calling thread the compute thread count (call before its first torch op)."""
    torch.set_num_threads(intraop_threads())
