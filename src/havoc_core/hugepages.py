"""Tensors that every decode step streams, copied into one block of memory backed by transparent
huge pages (Linux). With 4 KB pages, each step's walk through havoc-small's 69 MB of int4 and
int8 kernel layouts missed the TLB on nearly every page: in 2 MB pages the products took 1.59
instead of 1.98 ms a step, and a compiled int4 step 3.95 instead of 4.2 ms (docs/LOG.md).
Where the kernel offers no huge pages (THP "never", other systems) the copy is plain memory."""

from __future__ import annotations

import mmap
import sys

import torch
from torch import Tensor

HUGE_PAGE = 2 << 20
ALIGN = 64  # each tensor starts on a cache line


def huge_page_copies(tensors: list[Tensor]) -> list[Tensor]:
    """Copies of CPU ``tensors`` (contiguous) side by side in one anonymous mapping advised to use
    huge pages; the mapping lives as long as any of the copies. Unchanged where that is not Linux."""
    if not tensors or sys.platform != "linux" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return tensors
    sizes = [-(-t.numel() * t.element_size() // ALIGN) * ALIGN for t in tensors]
    block = mmap.mmap(-1, sum(sizes) + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    block.madvise(mmap.MADV_HUGEPAGE)
    memory = torch.frombuffer(block, dtype=torch.uint8)  # (holds the mapping)
    at = -memory.data_ptr() % HUGE_PAGE  # the first huge page boundary
    copies = []
    for t, size in zip(tensors, sizes, strict=True):
        nbytes = t.numel() * t.element_size()
        copy = memory[at : at + nbytes].view(t.dtype).view(t.shape)
        copy.copy_(t)
        copies.append(copy)
        at += size
    return copies
