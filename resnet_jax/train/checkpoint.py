"""Orbax checkpoints in ``WORKDIR/checkpoints``: the latest k and the best by test accuracy.

Each checkpoint holds the train state and a JSON ``meta`` item (model, dataset, config and the
data position, which is the step: the input pipeline is a pure function of seed and step). Orbax
writes to a temporary directory and renames it when complete, so a crash never leaves a
half-written checkpoint in place of a good one.

Files can still be damaged after they are written (a flipped bit on disk, a truncated copy), and
tensorstore restores a damaged array without a word. So ``meta`` records a digest of the state's
contents, and every read of a state (`Checkpoints.restore`, `Checkpoints.read_state`) checks it:
a checkpoint is "good" only if it reads back exactly as it was saved.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as keep

from resnet_jax.faults import CorruptDataError, StorageError, find_storage_error

ACCURACY = "test_accuracy"
DIGEST = "state_digest"  # the meta key of the state's digest
CORRUPT_FOLDER = "corrupt_checkpoints"  # beside checkpoints/: where damaged checkpoints are set aside
Read = TypeVar("Read")

# Checkpoints between evaluations carry no accuracy by design, and readers open them read-only: orbax would warn at
# each of them.
QUIET = ("did not provide metrics", "read_only=True, setting", "Given directory is read only")
logging.getLogger("absl").addFilter(lambda record: not any(note in record.getMessage() for note in QUIET))


class FailedWrites(logging.Filter):
    """Keeps the first storage fault that orbax's background saving logs, and drops those log records.

    Orbax's finalising thread catches the error of a failed asynchronous save itself, logs it (one traceback from
    each of its writing tasks: hundreds of lines for one full disk) and goes on, so the error never reaches
    ``check_for_errors``. `Checkpoints` installs this filter while it is open, and raises the fault it kept.
    """

    LOGGERS = ("absl", "asyncio")

    def __init__(self) -> None:
        super().__init__()
        self.error: OSError | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        found = find_storage_error(record.exc_info[1]) if record.exc_info and record.exc_info[1] else None
        if found is None:
            return True
        self.error = self.error or found
        return False

    def install(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)

    def remove(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self)


def state_digest(state: Any) -> dict[str, Any] | None:
    """SHA-256 of a train state's arrays (each leaf's dtype, shape and bytes) and their size in bytes; None for a
    state that this process does not hold whole (an array sharded over other processes).

    The leaves' digests are combined in sorted order, so that a state restored as a plain tree (`read_state`)
    has the digest of the train state that was saved, and integers are hashed as int64, so that a step counter
    restored as another integer type has it too.
    """
    leaves, size = [], 0
    for leaf in jax.tree.leaves(state):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            if not leaf.is_fully_replicated:
                return None
            leaf = leaf.addressable_data(0)
        array = np.asarray(leaf)
        size += array.nbytes
        if not np.issubdtype(array.dtype, np.inexact):  # counters restore in the dtype of the state asked for
            array = array.astype(np.int64)
        array = np.ascontiguousarray(array)
        leaves.append(hashlib.sha256(f"{array.dtype.str}{array.shape}".encode() + array.tobytes()).hexdigest())
    return {"sha256": hashlib.sha256("".join(sorted(leaves)).encode()).hexdigest(), "bytes": size}


def check_digest(state: Any, meta: dict, step: int, directory: Path) -> None:
    """Raise `CorruptDataError` unless ``state`` has the digest that ``meta`` recorded at saving. Checkpoints
    from before digests were recorded are checked to hold finite values at least (every saved state was)."""
    recorded = meta.get(DIGEST)
    if recorded is None:
        if not all(
            np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state) if np.issubdtype(x.dtype, np.inexact)
        ):
            raise CorruptDataError(f"checkpoint {step} in {directory} holds non-finite values")
        return
    found = state_digest(state)
    if found is not None and found["sha256"] != recorded["sha256"]:
        raise CorruptDataError(f"checkpoint {step} in {directory} does not match the digest recorded when it was saved")


@contextlib.contextmanager
def reading(step: int, directory: Path) -> Iterator[None]:
    """Any failure to read checkpoint ``step`` (orbax and tensorstore raise many types) as `CorruptDataError`."""
    try:
        yield
    except CorruptDataError:
        raise
    except Exception as error:
        raise CorruptDataError(
            f"checkpoint {step} in {directory} is unreadable ({type(error).__name__}: {str(error)[:200]})"
        ) from error


class Checkpoints:
    """Save every ``every_steps`` and at the end; restore the latest (or a given) step, checked against its digest.

    ``read_only`` opens the checkpoints of a finished or running run for reading: nothing is created or moved.
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        every_steps: int,
        keep_latest: int,
        async_save: bool = True,
        read_only: bool = False,
    ) -> None:
        self.directory = Path(workdir).resolve() / "checkpoints"
        if read_only and not self.directory.is_dir():
            raise FileNotFoundError(
                f"No checkpoints/ folder in {Path(workdir)}: give the --workdir of a `resnet-jax train` run or the "
                "--out of `resnet-jax convert`."
            )
        policy = keep.AnyPreservationPolicy(
            [
                keep.LatestN(keep_latest),
                keep.BestN(get_metric_fn=lambda m: m[ACCURACY], n=1, keep_checkpoints_without_metrics=False),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(every_steps),
            preservation_policy=policy,
            best_fn=lambda m: m[ACCURACY],  # makes orbax store the metrics with each checkpoint
            enable_async_checkpointing=async_save,
            read_only=read_only,
        )
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        with self.writing("opening the checkpoints"):
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self.last_good: int | None = None  # the newest step saved by this process or restored and checked
        self._saving: tuple[int, int] | None = None  # the step and size in bytes of the latest save
        self._closed = False
        self._failed = False  # a StorageError was raised: closing does not raise it again
        self._failed_writes = FailedWrites()
        self._failed_writes.install()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        """Every kept step, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def best_step(self) -> int | None:
        """The kept step with the highest test accuracy (the latest among equals)."""
        scored = []
        for step in self.manager.all_steps():
            metrics = self.manager.metrics(step)
            if metrics and ACCURACY in metrics:
                scored.append((metrics[ACCURACY], step))
        return max(scored)[1] if scored else None

    def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None, force: bool = False) -> bool:
        """Start an (asynchronous) save of ``state``, with its digest in ``meta``; ``metrics`` holds the test
        accuracy that ranks "best". A failed earlier save raises `StorageError` here, before another starts."""
        self.check_saves()
        digest = state_digest(state)
        meta = meta if digest is None else {**meta, DIGEST: digest}
        self._saving = (step, digest["bytes"] if digest else 0)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        with self.writing(f"saving checkpoint {step}"):
            saved = self.manager.save(step, args=args, metrics=metrics, force=force)
        if saved:
            self.last_good = step  # its state passed the loop's finiteness check before this call
        return saved

    def check_saves(self, waiting: bool = True) -> None:
        """Raise `StorageError` if a save in the background failed (a full disk, say): training must not go on
        past a checkpoint that was not written. ``waiting=False`` only looks at what orbax logged, without waiting
        for its metadata writes: cheap enough for every step."""
        if waiting:
            with self.writing(self._doing()):
                self.manager.check_for_errors()
        if self._failed_writes.error is not None:
            self._failed = True
            raise StorageError(self._storage_message(self._failed_writes.error, self._doing()))

    def _doing(self) -> str:
        return f"saving checkpoint {self._saving[0]}" if self._saving else "saving a checkpoint"

    @contextlib.contextmanager
    def writing(self, doing: str) -> Iterator[None]:
        """A full or unwritable disk met while ``doing`` as one `StorageError` line; other errors as they are."""
        try:
            yield
        except Exception as error:
            cause = find_storage_error(error)
            if cause is None:
                raise
            self._failed = True
            raise StorageError(self._storage_message(cause, doing)) from None

    def _storage_message(self, cause: OSError, doing: str) -> str:
        message = f"cannot write {self.directory} while {doing} ({cause.strerror or cause})"
        if self._saving is not None and self._saving[1]:
            with contextlib.suppress(OSError):
                stats = os.statvfs(self.directory)
                free = stats.f_bavail * stats.f_frsize
                message += f"; a checkpoint needs about {self._saving[1] / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free"
        return (
            f"{message}. Training stopped; the checkpoints before it are intact. Free some space (or choose a "
            "--workdir on another disk) and run the same command to resume."
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """The state (shaped and sharded like ``abstract_state``) and meta of ``step`` (default latest); raises
        `CorruptDataError` if it cannot be read or does not match its digest."""
        step = self.latest_step() if step is None else step
        meta = self.read_meta(step)
        with reading(step, self.directory):
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            ).state
        check_digest(restored, meta, step, self.directory)
        self.last_good = step if self.last_good is None else max(self.last_good, step)
        return restored, meta

    def read_state(self, step: int | None = None) -> dict:
        """The saved train state as a plain tree on this process's first device, whatever wrote it, checked
        against its digest.

        For reading a checkpoint without rebuilding its model and optimizer (analysis, tests), also
        one written by another number of devices or processes.
        """
        step = self.latest_step() if step is None else step
        meta = self.read_meta(step)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        with reading(step, self.directory):
            metadata = self.manager.item_metadata(step)["state"]
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
            state = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
        check_digest(state, meta, step, self.directory)
        return state

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step not in self.manager.all_steps():
            kept = ", ".join(map(str, self.steps())) or "none"
            raise FileNotFoundError(f"No checkpoint {step} in {self.directory}; its steps: {kept}.")
        with reading(step, self.directory):
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            if not isinstance(meta, dict):
                raise TypeError(f"its meta is a {type(meta).__name__}, not a dict")
        return meta

    def newest_readable(self, read: Callable[[int], Read], set_aside: bool) -> tuple[int, Read] | None:
        """``read(step)`` of the newest step it succeeds on, and that step; None if there is no checkpoint.

        A checkpoint that ``read`` finds damaged (`CorruptDataError`) is skipped with a warning and, where
        ``set_aside``, moved to ``corrupt_checkpoints/``. Other errors (a checkpoint of another run: the user's
        mistake, not damage) propagate and nothing is moved. Raises `CorruptDataError` when every checkpoint
        is damaged.
        """
        steps = self.steps()
        for step in steps:
            try:
                return step, read(step)
            except CorruptDataError as error:
                self._skip(step, error, set_aside)
        if steps:
            where = f"set aside in {self.directory.parent / CORRUPT_FOLDER}" if set_aside else "left in place"
            raise CorruptDataError(f"every checkpoint in {self.directory} is damaged (steps {steps}; {where})")
        return None

    def _skip(self, step: int, error: CorruptDataError, set_aside: bool) -> None:
        if not set_aside:
            logging.warning("%s; trying the one before it.", error)
            return
        aside = unused_path(self.directory.parent / CORRUPT_FOLDER / str(step))
        logging.warning("%s; moved it to %s and trying the one before it.", error, aside)
        if jax.process_index() == 0:
            aside.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(self.directory / str(step), aside)
        multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self.manager.reload()

    def close(self) -> None:
        """Wait for saves in flight and release the manager; a save that failed raises `StorageError`. Closing
        again does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            with contextlib.suppress(Exception) if self._failed else contextlib.nullcontext():
                with self.writing(self._doing()):
                    self.manager.wait_until_finished()
                self.check_saves()
        finally:
            self.manager.close()
            self._failed_writes.remove()


def unused_path(path: Path) -> Path:
    """``path``, or ``path.1``, ``path.2``, ... : the first that does not exist (a step set aside again)."""
    candidate, copy = path, 0
    while candidate.exists():
        copy += 1
        candidate = path.with_name(f"{path.name}.{copy}")
    return candidate
