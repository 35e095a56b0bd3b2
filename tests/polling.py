"""Waiting in tests for what other processes make true, without fixed sleeps."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T | None]],
    timeout_s: float = 60.0,
    what: str = "the condition",
    *,
    interval_s: float = 0.2,
) -> T:
    """The probe's first truthy value, asked every `interval_s`; AssertionError naming `what`
    (and the last value seen) after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout_s}s (last: {value!r})")
        await asyncio.sleep(interval_s)
