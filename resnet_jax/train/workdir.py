"""One run per workdir: a lock that the run's lead process holds while it trains.

Two runs in one workdir would interleave metrics.jsonl, share a TensorBoard file and overwrite each other's
checkpoints. The lock is ``fcntl.flock`` on ``WORKDIR/.lock``: the kernel drops it when its process ends, however
it ends (SIGKILL and crashes included), so a dead run never leaves its workdir stuck, and the file's text (who holds
it) is only read to name the holder. In a job of several processes only the lead writes the run's files, so only
it takes the lock, and every process learns whether it got it before anything compiles.

``flock`` is exact on a local disk and on NFS v4 mounts; on file systems that ignore it (some FUSE mounts of
buckets), two runs are not kept apart.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import socket
import sys
from pathlib import Path
from typing import TextIO

import jax
import numpy as np
from jax.experimental import multihost_utils

from resnet_jax.faults import StorageError, WorkdirInUseError, storage_error

LOCK_FILE = ".lock"


class WorkdirLock:
    """Held by the run of a workdir until `release` (or the end of its process)."""

    def __init__(self, workdir: str | Path) -> None:
        self.path = Path(workdir) / LOCK_FILE
        self._file: TextIO | None = None

    def acquire(self) -> None:
        """Take the lock, or raise `WorkdirInUseError` naming the process that holds it."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            file = self.path.open("a+")
        except OSError as error:
            raise storage_error(error, self.path.parent, "creating the workdir") from None
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise WorkdirInUseError(
                f"{self.path.parent} is in use by another run ({holder}); wait for it to end, or choose another "
                "--workdir."
            ) from None
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} on {socket.gethostname()}, since {started}: {' '.join(sys.argv)}\n")
        file.flush()
        self._file = file

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):  # its text only names the holder: a stale one misleads nobody
                self._file.truncate(0)
            self._file.close()  # closing drops the flock
            self._file = None


def hold_workdir(workdir: str | Path) -> WorkdirLock:
    """The workdir's lock, taken by the lead process of the job; every process raises if the lead could not take
    it, so that no process goes on to compile. Release it with `WorkdirLock.release`."""
    lock = WorkdirLock(workdir)
    failure: Exception | None = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except (WorkdirInUseError, StorageError) as error:
            failure = error
    if jax.process_count() > 1:
        failed = multihost_utils.process_allgather(np.int32(failure is not None))
        if np.any(failed) and failure is None:
            raise WorkdirInUseError(f"the job's lead process could not take {lock.path}: its message says why.")
    if failure is not None:
        raise failure
    return lock
