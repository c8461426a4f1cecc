"""Orbax checkpoints in ``WORKDIR/checkpoints``: the latest k and the best by test accuracy.

Each checkpoint holds the train state and a JSON ``meta`` item (model, dataset, config and the
data position, which is the step: the input pipeline is a pure function of seed and step). Orbax
writes to a temporary directory and renames it when complete, so a crash never leaves a
half-written checkpoint in place of a good one.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as keep

ACCURACY = "test_accuracy"

# Checkpoints between evaluations carry no accuracy by design; orbax would warn at each of them.
logging.getLogger("absl").addFilter(lambda record: "did not provide metrics" not in record.getMessage())


class Checkpoints:
    """Save every ``every_steps`` and at the end; restore the latest (or a given) step."""

    def __init__(self, workdir: str | Path, *, every_steps: int, keep_latest: int, async_save: bool = True) -> None:
        self.directory = Path(workdir).resolve() / "checkpoints"
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
        )
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The kept step with the highest test accuracy (the latest among equals)."""
        scored = []
        for step in self.manager.all_steps():
            metrics = self.manager.metrics(step)
            if metrics and ACCURACY in metrics:
                scored.append((metrics[ACCURACY], step))
        return max(scored)[1] if scored else None

    def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None, force: bool = False) -> bool:
        """Start an (asynchronous) save; ``metrics`` holds the test accuracy that ranks "best"."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        return self.manager.save(step, args=args, metrics=metrics, force=force)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """The state (shaped and sharded like ``abstract_state``) and meta of ``step`` (default latest)."""
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
        )
        return restored.state, restored.meta

    def read_state(self, step: int | None = None) -> dict:
        """The saved train state as a plain tree on this process's first device, whatever wrote it.

        For reading a checkpoint without rebuilding its model and optimizer (analysis, tests), also
        one written by another number of devices or processes.
        """
        step = self.latest_step() if step is None else step
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        metadata = self.manager.item_metadata(step)["state"]
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state

    def restore_latest_valid(self, abstract_state: Any, check_meta: Callable[[dict], None]) -> tuple[Any, dict] | None:
        """The newest readable checkpoint, or None if there is none.

        An unreadable one (truncated or corrupted files) is moved to ``corrupt_checkpoints/`` with a
        warning and the one before it is tried. ``check_meta`` may refuse a checkpoint of another run
        by raising: that is the user's mistake, not corruption, so nothing is moved.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta = self.read_meta(step)
            except Exception as error:  # orbax raises many types for unreadable files
                self._set_aside(step, error)
                continue
            check_meta(meta)
            try:
                state, _ = self.restore(abstract_state, step)
            except Exception as error:
                self._set_aside(step, error)
                continue
            return state, meta
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        aside = self.directory.parent / "corrupt_checkpoints" / str(step)
        logging.warning(
            "Checkpoint %d in %s is unreadable (%s: %s); moved it to %s and trying the previous one.",
            step,
            self.directory,
            type(error).__name__,
            str(error)[:300],
            aside,
        )
        if jax.process_index() == 0:
            aside.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(self.directory / str(step), aside)
        multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self.manager.reload()

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def close(self) -> None:
        """Wait for saves in flight and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
