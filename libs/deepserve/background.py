"""Stopping a service's background loops so that shutdown always ends.

On Python 3.11 one `task.cancel()` is not always enough: `asyncio.wait_for` (used by etcd and
Redis clients and by our own bounded calls) drops a CancelledError that arrives as the inner call
completes, and a loop that swallowed it runs on. A stop that awaited it once then hangs: seen
as a pod's UnloadModel waiting out its caller's deadline, and as a podpool test whose teardown
never returned on a loaded CI host.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)


async def stop_task(task: asyncio.Task[Any] | None, retry_s: float = 0.5) -> None:
    """Cancels `task` and waits for it to end, cancelling again while it runs on.

    A failure the task ended with is logged, not raised: the caller is shutting down.
    """
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=retry_s)
    if not task.cancelled() and task.exception() is not None:
        log.warning("background task %s failed", task.get_name(), exc_info=task.exception())


async def stop_tasks(tasks: list[asyncio.Task[Any]], retry_s: float = 0.5) -> None:
    """`stop_task` for several tasks at once."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        await stop_task(task, retry_s)
