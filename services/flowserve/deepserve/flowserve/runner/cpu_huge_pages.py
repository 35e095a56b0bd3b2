"""Transparent huge pages for torch's large CPU tensors, asked for before torch loads.

A CPU forward streams every weight (the reordered and panel copies torch allocates) each step
through activations of megabytes: with 4 KiB pages that is a TLB miss every few cache lines.
The KV cache is not torch's allocation and keeps 4 KiB pages (`kv_cache_tensors`). torch's CPU
allocator aligns allocations of 2 MiB and more to huge pages and asks the kernel for them
(`madvise(MADV_HUGEPAGE)`) when THP_MEM_ALLOC_ENABLE is set; it reads the variable once, at its
first allocation, so the pod's entry points set it before they import torch. Hosts whose THP
mode is `madvise` (the common default) give huge pages only to such requests. Measured:
bench/RESULTS.md, issue #19.

This module imports nothing from torch (nor does its package), so importing it costs nothing.
"""

from __future__ import annotations

import os

THP_ENV = "THP_MEM_ALLOC_ENABLE"


def ask_for_huge_pages() -> None:
    """Asks torch for huge pages, unless the environment already says (0 keeps them off)."""
    os.environ.setdefault(THP_ENV, "1")
