"""Large freed blocks go back to the system: glibc's ``M_MMAP_THRESHOLD``, fixed for the task's process.

Why: an export to Klaviyo builds each job's body, up to 5 MB, in one of its sending threads and frees it once the
job is submitted. glibc serves a block that large with ``mmap`` and unmaps it when freed, but then raises its
threshold to that block's size ("dynamic mmap threshold", mallopt(3)), so the next bodies come from the sending
thread's own heap arena, which keeps the pages after they are freed: with twenty jobs in flight the task's peak
RSS grew by ~70-110 MB over what it held. Measured at 1,000,000 profiles (make bench's cases, one run each), peak
RSS without -> with the threshold fixed at 256 KiB: Parquet 380 -> 312 MB, PostgreSQL 366 -> 258 MB, same wall and
CPU. At glibc's initial 128 KiB: Parquet 311 MB, but the PostgreSQL case took 56-57 s of wall against 51; at 1 MiB:
325 and 278 MB; ``MALLOC_ARENA_MAX=2`` instead: Parquet 333 MB.

Setting ``M_MMAP_THRESHOLD`` explicitly "disables the dynamic adjustment" (mallopt(3),
https://man7.org/linux/man-pages/man3/mallopt.3.html). The environment variable ``MALLOC_MMAP_THRESHOLD_`` does the
same, but it is read when the process starts, and an Airflow task's process is already running when the operator
is. The setting is the process's: an Airflow 3 task runs in a process of its own (the supervisor's child), so it
lasts the task's run. Elsewhere than glibc (musl, macOS) nothing is changed."""

from __future__ import annotations

import ctypes
import platform

#: mallopt(3)'s parameter number of M_MMAP_THRESHOLD (glibc's malloc.h)
M_MMAP_THRESHOLD = -3
#: blocks at least this large are mapped on their own and unmapped when freed (glibc starts at 128 KiB; see above)
THRESHOLD = 256 * 1024


def return_large_blocks(threshold: int = THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; whether it was set (False off glibc)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1  # mallopt returns 1 on success
