"""Host memory for XLA:CPU: keep freed memory in the process for reuse instead of mapping it afresh each step.

XLA:CPU allocates the temporaries of each execution as one block (over a hundred MiB for a CIFAR ResNet's train
step) and frees it when the step ends. glibc serves a block that large from a fresh ``mmap`` (a thread's arena
cannot hold it), so every step page-faults the whole block in again and the kernel zeroes it: a large share of a
CPU step's time (benchmarks/README.md). With one arena, no ``mmap`` and no trimming, glibc hands the same memory
back each step. The price: the process keeps its memory until it exits (a somewhat higher peak RSS). On GPU and
TPU hosts XLA's temporaries live on the device, and the setting changes little either way.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Mapping

# mallopt(3) parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
KEEP_UP_TO_BYTES = 2**31 - 1  # the largest trim threshold mallopt takes (an int)


def keep_freed_host_memory() -> bool:
    """Make glibc's malloc reuse freed memory (one arena, no mmap, no trimming); True where that was set.

    Call it before JAX runs anything: each thread keeps the arena it first allocated from, and XLA's threads
    start with the backend, so a later call leaves XLA's blocks mapped afresh each step. The CLI calls it
    first thing. Elsewhere than glibc on Linux it does nothing and returns False.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it; musl's mallopt ignores these settings)
    except (OSError, AttributeError):
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, KEEP_UP_TO_BYTES))
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)


def with_huge_pages(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for a new process whose malloc backs its heap with transparent huge pages (glibc 2.35 and later).

    Fewer TLB misses over XLA's reused blocks make a one-core step a few percent faster (benchmarks/README.md).
    glibc reads this setting (``GLIBC_TUNABLES``) only when a process starts, so the processes this project
    starts get it.
    """
    tunables = [tunable for tunable in env.get("GLIBC_TUNABLES", "").split(":") if tunable]
    return {**env, "GLIBC_TUNABLES": ":".join([*tunables, "glibc.malloc.hugetlb=1"])}
