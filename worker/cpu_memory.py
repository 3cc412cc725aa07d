"""Memory settings for a process that runs a model on the CPU: glibc's malloc, oneDNN's caches.

Every step allocates and frees the same activation tensors (hundreds of KB to tens of MB). With
glibc's defaults, blocks that large are mmap'ed and unmapped, or the freed top of the heap is
trimmed back to the OS, so the next step page-faults all of that memory in again. Measured on
SmolLM2 at 32 sequences: ~2,300 minor faults a step, and the KV gather of one layer's decode
attention taking 1.3 ms instead of 60 us. Keeping freed memory in the heap removes both.

Loading is the exception: its temporaries (checkpoint tensors, the plain weights that packing
replaces) are freed once and never needed again. So the runner loads with glibc's defaults,
trims the heap, and only then keeps what steps free (SmolLM2 in bf16: the worker's resident
memory after loading 1617 -> ~1450 MiB with a 720 MiB KV cache; not importing torch._dynamo,
worker.loader, took it to 1307).

oneDNN (the packed bf16 linears) keeps each primitive it creates, twice: torch's ideep layer and
oneDNN itself each cache up to 1024 of them, keyed by shape, and a primitive holds memory in
proportion to its output (measured: ~M x N x 2 bytes for M tokens against N outputs, 6.3 MiB for
SmolLM2's gate_up at M = 1000). M is a step's token count, which real traffic changes nearly
every step, so the worker grew without bound: 603 -> 1313 MiB over 600 mixed requests with a
57 MiB KV cache (in-process, ~+65 MiB per 48 varied prompts). 32 entries each hold the shapes a
steady decode repeats; the varied workload ran as fast (32-34 s against 32-33 s) and stayed at
~700 MiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum: larger blocks are mmap'ed whatever is asked
TRIM_THRESHOLD = 1 << 30
ONEDNN_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")  # oneDNN's, torch ideep's
ONEDNN_CACHE_CAPACITY = 32


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def release_freed_memory() -> bool:
    """Give the heap's free pages back to the OS (glibc malloc_trim). False where there is none."""
    libc = _libc()
    return libc is not None and hasattr(libc, "malloc_trim") and bool(libc.malloc_trim(0))


def keep_freed_memory() -> bool:
    """Serve blocks up to 32 MiB from the heap and stop trimming it. False where libc is not glibc."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def bound_onednn_caches() -> None:
    """Cap oneDNN's primitive caches, unless the environment already sets them. Both are read when
    the process creates its first primitive, so this must run before anything uses oneDNN."""
    for name in ONEDNN_CACHES:
        os.environ.setdefault(name, str(ONEDNN_CACHE_CAPACITY))
