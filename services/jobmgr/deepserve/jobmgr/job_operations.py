"""One background operation per job for a workload controller (fine-tuning, batch).

The leader's reconcile pass starts an operation for a job that needs one and cancels it when
the job ends; when an operation finishes, `wake` is set so the loop looks again at once.
Losing leadership cancels them all; the next leader starts them again from etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)


class JobOperations:
    """Running operations by job id."""

    def __init__(self, kind: str, on_done: Callable[[str], None] | None = None) -> None:
        self._kind = kind
        self._on_done = on_done
        self._ops: dict[str, asyncio.Task[None]] = {}
        self.wake = asyncio.Event()

    def get(self, job_id: str) -> asyncio.Task[None] | None:
        return self._ops.get(job_id)

    def spawn(self, job_id: str, coro: Coroutine[Any, Any, None]) -> None:
        op = asyncio.create_task(coro, name=f"{self._kind}:{job_id}")
        self._ops[job_id] = op

        def done(_: asyncio.Task[None]) -> None:
            self._ops.pop(job_id, None)
            if self._on_done is not None:
                self._on_done(job_id)
            self.wake.set()
            if not op.cancelled() and op.exception() is not None:
                log.error("%s operation %s failed", self._kind, job_id, exc_info=op.exception())

        op.add_done_callback(done)

    async def stop(self) -> None:
        """Cancels every operation (losing leadership, shutdown); a new leader resumes them."""
        ops = list(self._ops.values())
        for op in ops:
            op.cancel()
        for op in ops:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await op
