"""The ``--cpu-processes`` launcher: one job of N processes on this machine's CPU, each pinned to its own cores.

XLA:CPU's convolutions barely use a second core (benchmarks/README.md), so one process per core trains faster
than one process on all of them. The processes form one multi-process JAX job over gloo on 127.0.0.1, as hosts
of a cluster would, with pmap's per-device batch norm: jit's global batch norm would all-reduce its statistics
at every layer, and each gloo collective costs milliseconds.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from resnet_jax.cpu.host_memory import with_huge_pages

# Pins itself to cores "0,1,..." and becomes the command that follows (a fork of a process that runs JAX
# threads must not run Python code, so Popen's preexec_fn cannot do this).
PIN_THEN_EXEC = (
    "import os, sys; os.sched_setaffinity(0, map(int, sys.argv[1].split(','))); os.execv(sys.argv[2], sys.argv[2:])"
)
GRACE_SECONDS = 60  # for the other processes of a job to finish a checkpoint, then to obey SIGTERM


def available_cores() -> list[int]:
    """The cores this process may run on: its affinity on Linux (where each process of ``--cpu-processes`` is
    pinned to its own), else every core of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def cores_per_process(num_processes: int) -> list[list[int]]:
    """The cores of each of ``num_processes`` pinned processes; refuses what cannot be pinned."""
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("--cpu-processes pins each process to its cores, which needs Linux; run one process here.")
    return core_groups(available_cores(), num_processes)


def core_groups(cores: Sequence[int], num_processes: int) -> list[list[int]]:
    """Split ``cores`` into ``num_processes`` contiguous groups of near-equal size."""
    if not 1 <= num_processes <= len(cores):
        raise ValueError(
            f"--cpu-processes {num_processes}: this machine lets us use {len(cores)} core(s); "
            f"choose 1..{len(cores)} processes (one core or more each)."
        )
    cores = sorted(cores)
    size, extra = divmod(len(cores), num_processes)
    starts = [i * size + min(i, extra) for i in range(num_processes + 1)]
    return [cores[a:b] for a, b in itertools.pairwise(starts)]


def check_cpu_processes(config: ml_collections.ConfigDict, num_processes: int) -> None:
    """Refuse what `launch_cpu_processes` cannot run, before any process starts."""
    cores_per_process(num_processes)
    if config.distributed.coordinator_address is not None or config.distributed.auto_detect:
        raise ValueError("--cpu-processes makes its own job on this machine; drop the config.distributed settings.")
    if config.parallelism != "pmap":
        raise ValueError(
            "--cpu-processes needs --config.parallelism=pmap: the processes exchange data through gloo, and "
            "jit's global batch norm all-reduces its statistics at every layer (many times slower than pmap, "
            "whose devices normalise with their own statistics)."
        )
    for key in ("batch_size", "eval_batch_size"):
        if config[key] % num_processes:
            raise ValueError(f"{key}={config[key]} does not split over {num_processes} processes; make it a multiple.")


def start_cpu_processes(
    command: Callable[[str, int], list[str]], groups: Sequence[Sequence[int]], **popen: Any
) -> list[subprocess.Popen]:
    """Start ``command(coordinator_address, rank)`` for every rank, process ``rank`` pinned to ``groups[rank]``.

    The coordinator listens on a free port of 127.0.0.1; the processes see the CPU only, and their malloc uses
    huge pages.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    return [
        subprocess.Popen(
            [sys.executable, "-c", PIN_THEN_EXEC, ",".join(map(str, cores)), *command(address, rank)],
            env=with_huge_pages({**os.environ, "JAX_PLATFORMS": "cpu"}),
            **popen,
        )
        for rank, cores in enumerate(groups)
    ]


def launch_cpu_processes(command: Sequence[str], num_processes: int) -> int:
    """Run ``resnet-jax COMMAND`` as ``num_processes`` processes of one job on this machine's CPU.

    Each process is pinned to its own group of cores and the job's collectives go through gloo on
    127.0.0.1. SIGTERM is passed on (every process saves a checkpoint and stops); Ctrl-C reaches the
    processes directly. If one process fails, the others, which would wait for it forever, are stopped.
    Returns the first non-zero exit status, else 0.
    """
    groups = cores_per_process(num_processes)
    print(f"resnet-jax: {num_processes} processes, cores {' | '.join(map(str, groups))}", flush=True)
    processes = start_cpu_processes(
        lambda address, rank: [
            *(sys.executable, "-m", "resnet_jax.cli", *command),
            f"--config.distributed.coordinator_address={address}",
            f"--config.distributed.num_processes={num_processes}",
            f"--config.distributed.process_id={rank}",
            "--config.distributed.cpu_collectives=true",
        ],
        groups,
    )
    previous = signal.signal(signal.SIGTERM, lambda signum, _: [p.send_signal(signum) for p in processes])
    previous_interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        while (failure := next((p.returncode for p in processes if p.poll()), None)) is None:
            if all(p.returncode is not None for p in processes):
                return 0
            time.sleep(0.2)
        # A process stopped on a signal (the others got it too and are saving) or failed (the others
        # would wait for it in a collective forever): give them time, then end them.
        for end in (None, subprocess.Popen.terminate, subprocess.Popen.kill):
            for p in processes:
                if end is not None and p.poll() is None:
                    end(p)
            deadline = time.monotonic() + GRACE_SECONDS
            while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
                time.sleep(0.2)
        return failure
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_interrupt)
