"""glibc malloc settings for a process that runs a model on the CPU.

Every step allocates and frees the same activation tensors (hundreds of KB to tens of MB). With
glibc's defaults, blocks that large are mmap'ed and unmapped, or the freed top of the heap is
trimmed back to the OS, so the next step page-faults all of that memory in again. Measured on
SmolLM2 at 32 sequences: ~2,300 minor faults a step, and the KV gather of one layer's decode
attention taking 1.3 ms instead of 60 us. Keeping freed memory in the heap removes both.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum: larger blocks are mmap'ed whatever is asked
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Serve blocks up to 32 MiB from the heap and stop trimming it. False where libc is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
