"""Runs a kernel call at a given thread count: kernels that share work out as threads free up
must give the same bits whichever thread did which part."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

# More threads than this machine kind's 2 cores: the threads hand work back and forth more often.
OVERSUBSCRIBED = 4


@contextmanager
def threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def same_bits_at_every_thread_count(call: Callable[..., torch.Tensor], *args: object) -> None:
    """call(*args) at 1 thread, then at 2 and oversubscribed, three times each."""
    with threads(1):
        alone = call(*args)
    for count in (2, OVERSUBSCRIBED):
        with threads(count):
            for _ in range(3):
                assert torch.equal(call(*args), alone), f"{count} threads changed the result"
