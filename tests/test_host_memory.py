"""`keep_freed_host_memory`: an XLA:CPU execution's temporaries are reused, not faulted in afresh each call."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from resnet_jax.cpu.processes import available_cores, start_cpu_processes

# A jitted function whose temporaries (two 96 MiB cumulative sums) are one block larger than a glibc thread
# arena holds; prints that block's size and the page faults of each of 24 calls after the first.
FAULTS_PER_CALL = """
import resource, sys
if sys.argv[1] == "keep":
    from resnet_jax.cpu.host_memory import keep_freed_host_memory
    assert keep_freed_host_memory()
if sys.argv[1] == "cli":  # any resnet-jax command sets it first thing
    import contextlib, io
    from resnet_jax.cli import main
    with contextlib.redirect_stdout(io.StringIO()):
        main(["models"])
import jax, jax.numpy as jnp

step = jax.jit(lambda x: jnp.cumsum(jnp.cumsum(x)[::-1] * 0.5).sum())
x = jnp.ones(24 * 2**20)
compiled = step.lower(x).compile()
compiled(x).block_until_ready()
print(compiled.memory_analysis().temp_size_in_bytes)
for _ in range(24):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    compiled(x).block_until_ready()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults_per_call(mode: str) -> tuple[int, list[int]]:
    lines = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_CALL, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return int(lines[0]), [int(n) for n in lines[1:]]


@pytest.mark.slow  # over 30 s on 2 cores
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings exist on Linux only")
def test_an_execution_reuses_the_memory_of_its_temporaries_instead_of_faulting_it_in_again():
    """Directly, and as every ``resnet-jax`` command (train, bench, their worker processes) sets it."""
    temp_bytes, faults_default = faults_per_call("default")
    _, faults_kept = faults_per_call("keep")
    _, faults_after_cli = faults_per_call("cli")
    pages = temp_bytes // 4096
    print(
        f"temporaries {temp_bytes / 2**20:.0f} MiB ({pages} pages); faults per call: default {faults_default}, "
        f"kept {faults_kept}, after a resnet-jax command {faults_after_cli}"
    )
    assert temp_bytes > 64 * 2**20  # more than a glibc thread arena can hold, so by default a fresh mmap
    assert min(faults_default) > pages // 2  # by default every call faults the block in again
    # Kept: most calls fault nothing in. Over the first calls the heap still grows a block at a time (a call can
    # ask for its block before the last call's is back, or find the free block split by small allocations),
    # until it holds enough; the process keeps somewhat more memory (1,276 against 1,101 MiB for resnet20 at
    # batch 128).
    for faults in (faults_kept, faults_after_cli):
        assert sum(n < pages // 20 for n in faults) >= 16


# Allocates and touches 64 MiB through malloc (numpy would ask for huge pages itself), then prints how much of
# the process's memory is in huge pages.
HUGE_PAGES_IN_USE = """
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
ctypes.memset(libc.malloc(64 * 2**20), 1, 64 * 2**20)
rollup = open("/proc/self/smaps_rollup").read().splitlines()
print(next(int(line.split()[1]) for line in rollup if line.startswith("AnonHugePages:")))
"""


THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(
    not THP_MODE.exists() or "[madvise]" not in THP_MODE.read_text(),
    reason="huge pages make a difference where the kernel gives them on request only (madvise mode)",
)
def test_the_processes_of_cpu_processes_back_malloc_with_huge_pages():
    """Through the launcher of ``--cpu-processes``, against a plain child of the same process."""
    (worker,) = start_cpu_processes(
        lambda address, rank: [sys.executable, "-c", HUGE_PAGES_IN_USE], [available_cores()[:1]], stdout=subprocess.PIPE
    )
    huge_kib = int(worker.communicate()[0])
    plain = subprocess.run([sys.executable, "-c", HUGE_PAGES_IN_USE], capture_output=True, text=True, check=True)
    print(f"huge pages: {huge_kib} KiB in a worker, {plain.stdout.strip()} KiB in a plain process")
    assert huge_kib >= 32 * 1024
    assert int(plain.stdout) < 2 * 1024  # this is the launcher's doing, not the kernel's default
