"""glibc malloc settings for CPU training and export; the CLI applies them once per process.

PyTorch allocates CPU tensors with plain malloc. By default glibc serves blocks above its mmap
threshold (up to 32 MiB) with fresh mappings and trims the freed top of the heap, so every batch
page-faults its activations in again and the kernel zero-fills them page by page
(`benchmarks/bench_malloc.py` measures what this costs; docs/performance.md quotes it).
"""
from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1   # mallopt parameter numbers, from glibc's malloc.h


M_MMAP_MAX = -4


NEVER_TRIM = 2**31 - 1


def libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:   # pragma: no cover - not glibc
        return None


def keep_freed_memory(lib: ctypes.CDLL | None = None) -> bool:
    """Let glibc keep freed blocks for the next batch instead of handing them back to the OS.

    No mappings at all (every block comes from the heap, where a freed one is reused) and no
    trimming. Memory stays at its peak, as under CUDA's caching allocator. Returns False off glibc.
    """
    lib = lib if lib is not None else libc()
    if lib is None:
        return False
    lib.mallopt(M_MMAP_MAX, 0)
    lib.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)
    return True
