"""Tensors that every decode step streams, copied into one block of memory backed by transparent
huge pages (Linux). With 4 KB pages, each step's walk through havoc-small's 69 MB of int4 and
int8 kernel layouts missed the TLB on nearly every page: in 2 MB pages the products took 1.59
instead of 1.98 ms a step, and a compiled int4 step 3.95 instead of 4.2 ms (docs/LOG.md).
Where the kernel offers no huge pages (THP "never", other systems) the copies are plain memory."""

from __future__ import annotations

import mmap
import sys

import torch
from torch import Tensor

HUGE_PAGE = 2 << 20
ALIGN = 64  # each tensor starts on a cache line


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


class HugePageBlock:
    """``nbytes`` of one anonymous private mapping advised to use huge pages, filled by ``copy``
    one tensor at a time (so that a caller can make each tensor, copy it and drop it: the peak is
    the block and one tensor). The mapping lives as long as any of the copies."""

    def __init__(self, nbytes: int) -> None:
        if sys.platform == "linux" and hasattr(mmap, "MADV_HUGEPAGE"):
            block = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            block.madvise(mmap.MADV_HUGEPAGE)
            self.memory = torch.frombuffer(block, dtype=torch.uint8)  # (holds the mapping)
            boundary = HUGE_PAGE  # start at the first huge page boundary
        else:
            self.memory, boundary = torch.empty(nbytes + ALIGN, dtype=torch.uint8), ALIGN
        self.at = -self.memory.data_ptr() % boundary
        self.end = self.at + nbytes

    def copy(self, t: Tensor) -> Tensor:
        """A copy of the contiguous CPU tensor ``t`` in the block's next free bytes."""
        nbytes = t.numel() * t.element_size()
        assert self.at + nbytes <= self.end, f"block full: {nbytes} more bytes"
        out = self.memory[self.at : self.at + nbytes].view(t.dtype).view(t.shape)
        out.copy_(t)
        self.at += aligned(nbytes)
        return out
