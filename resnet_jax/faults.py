"""The kinds of fault a command reports in one line, each with its own exit status (`resnet_jax.cli.EXIT_STATUS`).

Bad input stays a ValueError or FileNotFoundError (exit 2) and divergence a FloatingPointError (exit 1); the
classes here are the faults that are neither: a damaged file, storage that cannot be written, a workdir that
another run holds. This module imports nothing of the package, so that any module may raise them.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

# The errnos of storage that refuses a write: no space or quota left, a read-only mount, no permission.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST)


class CorruptDataError(Exception):
    """A file that the command reads is damaged: a checkpoint that fails its check, a truncated data file."""


class StorageError(Exception):
    """The command cannot write where it must: the disk is full, the mount is read-only, permission is denied."""


class WorkdirInUseError(Exception):
    """Another run holds the workdir; two runs in one workdir would overwrite each other's files."""


def storage_error(error: OSError, path: str | Path, doing: str) -> StorageError:
    """One line for an OSError of writing ``path`` while ``doing`` something, saying what the user can do."""
    advice = {
        errno.ENOSPC: "free some space or choose a folder on another disk",
        errno.EDQUOT: "the disk quota is spent: free some space or choose a folder on another disk",
        errno.EROFS: "it is on a read-only file system: choose a writable folder",
        errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
        errno.EEXIST: "a file of that name is in the way: choose another path",
    }.get(error.errno, "permission denied: choose a folder you can write to")
    reason = error.strerror or type(error).__name__
    return StorageError(f"cannot write {path} while {doing} ({reason}): {advice}.")


def find_storage_error(error: BaseException) -> OSError | None:
    """The OSError of full or unwritable storage in ``error``'s chain, or None. Libraries wrap it: tensorstore
    (under orbax) raises a ValueError whose text carries the errno as ``[os_error_code='28']``."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
            return error
        code = re.search(r"os_error_code='?(\d+)", str(error))
        if code and int(code.group(1)) in STORAGE_ERRNOS:
            return OSError(int(code.group(1)), os.strerror(int(code.group(1))))
        for inner in getattr(error, "exceptions", ()):  # an ExceptionGroup
            found = find_storage_error(inner)
            if found is not None:
                return found
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return None
