"""``train_and_evaluate``: the whole job, made of verbs that a notebook can also call one by one::

    run = prepare_run(config, workdir)  # data, model, optimizer, steps: every input checked, nothing compiled
    state, start = initial_state(run)  # the workdir's latest checkpoint, or a new state
    feed = create_feed(config, run.train_source, run.steps, run.mesh, start.step)
    state, metrics = feed(state, 1)  # one call of the train step
    test_metrics = evaluate_state(run.steps, state, run.test_source, run.batches)
    save_checkpoint(run, start.step + 1, state, run_meta(config, start.step + 1))
    close_run(run)  # waits for the save and releases the workdir

A run lives in its workdir: checkpoints/, metrics.jsonl, tensorboard/ and curves.png. Starting
again on the same workdir resumes from the latest readable checkpoint, with the data stream at the
same example, so that a run killed at any moment and restarted ends with the same parameters.
SIGTERM or SIGINT (preemption, Ctrl-C) finishes the current step, saves a checkpoint and stops.
With ``stop_at_test_accuracy`` set, the run stops at the first evaluation that reaches it: a time-to-accuracy
measurement, read from the ``elapsed_s`` of metrics.jsonl (wall time of the run, across resumptions).
`Callback` hooks observe the training steps and evaluations, and may stop the run.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from resnet_jax import data
from resnet_jax.compress.distill import attach_teacher, check_distillation
from resnet_jax.faults import CorruptDataError
from resnet_jax.models import ResNet
from resnet_jax.train import distributed, transfer
from resnet_jax.train.checkpoint import ACCURACY, CORRUPT_FOLDER, Checkpoints
from resnet_jax.train.feed import DeviceFeed, HostFeed, create_feed
from resnet_jax.train.optim import create_optimizer, learning_rate_schedule
from resnet_jax.train.reporting import MetricsLog, Progress, format_duration, plot_curves
from resnet_jax.train.runs import (
    batch_settings,
    build_model,
    check_batch_sizes,
    check_config,
    check_feed,
    load_run,
    new_train_state,
    run_meta,
)
from resnet_jax.train.steps import Metrics, Steps, TrainState, compile_steps, make_mesh
from resnet_jax.train.workdir import WorkdirLock, hold_workdir

Feed = HostFeed | DeviceFeed


class TrainingInterruptedError(Exception):
    """Training stopped on a signal after saving a checkpoint; the same command resumes it."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """Remembers SIGTERM/SIGINT instead of dying mid-step, so the loop can checkpoint first."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> StopSignals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.getsignal(signum)
        self.watch()
        return self

    def watch(self) -> None:
        """Handle the signals here (again): joining a multi-process job installs JAX's own SIGTERM handler."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum

    def agreed(self) -> int | None:
        """The signal any process received (all processes must stop at the same step)."""
        if jax.process_count() == 1:
            return self.received
        received = multihost_utils.process_allgather(np.int32(self.received or 0))
        return int(np.max(received)) or None


class Callback:
    """Watches a run of `train_and_evaluate`: subclass it and override either hook. A hook that returns True
    stops the run after the current call of the train step, with a checkpoint that a rerun resumes from.

    The training metrics come from the devices in windows (every ``log_every_steps`` and before each
    checkpoint), so `on_train_step` sees each step once, a little after it ran, and watching adds no wait for
    the devices. In a job of several processes every process calls the hooks with the same values: a hook that
    stops one process must stop them all.
    """

    def on_train_step(self, step: int, metrics: dict[str, Any]) -> bool | None:
        """Step number ``step`` (counting from 1) trained with ``metrics`` (loss, accuracy, finite, ...)."""
        return None

    def on_evaluation(self, step: int, state: TrainState, metrics: dict[str, float]) -> bool | None:
        """The ``state`` after ``step`` steps has the test ``metrics`` (loss, accuracy). ``state`` is as the compiled
        steps hold it (under pmap, one copy per device), and the next step donates its buffers: copy what you
        keep, e.g. ``jax.device_get(state.params)``."""
        return None


@dataclasses.dataclass(frozen=True)
class Run:
    """What a run trains with (`prepare_run`); its state is kept apart, as the verbs take and return it."""

    config: ml_collections.ConfigDict
    workdir: Path
    train_source: data.Source
    test_source: data.Source
    batches: data.BatchSettings
    model: ResNet
    schedule: optax.Schedule
    optimizer: optax.GradientTransformation
    mesh: Mesh
    steps: Steps
    steps_per_epoch: int
    target_accuracy: float  # 0: train every step
    checkpoints: Checkpoints
    lock: WorkdirLock  # one run per workdir: held from `prepare_run` until `close_run`
    progress: Progress
    began: float  # time.perf_counter() when this process began the run


@dataclasses.dataclass(frozen=True)
class Start:
    """Where a run starts: its first step, the wall time it ran before (a resumed run's clock goes on), the
    test accuracy it reached before and the test metrics of its step, as its checkpoint records them."""

    step: int = 0
    elapsed_s: float = 0.0
    reached: dict[str, float] | None = None
    test_metrics: dict[str, float] | None = None  # of the checkpoint's step, if it was evaluated


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """The final train state (one copy, as checkpoints hold it) and its test metrics (loss, accuracy)."""

    state: TrainState
    metrics: dict[str, float]


def writes_files() -> bool:
    """Whether this process writes the run's files and prints its progress: the first of a job's processes."""
    return jax.process_index() == 0


def use_compilation_cache(directory: str) -> None:
    """Keep compiled programs in ``directory`` (JAX's persistent compilation cache; a local path or a bucket),
    so that a restarted or repeated run loads its steps instead of compiling them again. "" leaves it off."""
    if directory and os.path.expanduser(directory) != jax.config.jax_compilation_cache_dir:
        from jax.experimental.compilation_cache import compilation_cache

        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        compilation_cache.reset_cache()  # JAX decides once whether to use it: at the first compile of the process


def prepare_run(config: ml_collections.ConfigDict, workdir: str | Path) -> Run:
    """Join the job, check ``config``, load its data, take the workdir (`hold_workdir`) and build its model,
    optimizer and steps (compiled when first called). Every check of the inputs happens here, before anything
    compiles. `close_run` releases what it holds."""
    began = time.perf_counter()
    distributed.initialize(config)
    use_compilation_cache(config.get("compilation_cache_dir", ""))
    check_config(config)
    check_distillation(config)
    train_source = data.load_run_source(config, config.train_split)
    test_source = data.load_run_source(config, config.eval_split)
    check_feed(config, train_source)
    steps_per_epoch = data.steps_per_epoch(train_source.num_examples, config.batch_size)
    schedule = learning_rate_schedule(config, steps_per_epoch)
    mesh = make_mesh()
    lock = hold_workdir(workdir)  # before anything in the workdir is read or written, and before any compile
    try:
        checkpoints = Checkpoints(
            workdir, every_steps=config.checkpoint_every_steps, keep_latest=config.keep_checkpoints
        )
    except BaseException:
        lock.release()
        raise
    return Run(
        config=config,
        workdir=Path(workdir),
        train_source=train_source,
        test_source=test_source,
        batches=batch_settings(config),
        model=build_model(config, train_source.num_classes),
        schedule=schedule,
        optimizer=create_optimizer(config, schedule),
        mesh=mesh,
        steps=compile_steps(mesh, config.label_smoothing, config.parallelism, config.batch_parts),
        steps_per_epoch=steps_per_epoch,
        target_accuracy=config.get("stop_at_test_accuracy", 0.0),
        checkpoints=checkpoints,
        lock=lock,
        progress=Progress(config.num_train_steps, 0, config.batch_size, enabled=writes_files()),
        began=began,
    )


def create_state(run: Run) -> TrainState:
    """A new train state: the model initialised from the config's seed, with the run's optimizer (and its teacher,
    where it distils)."""
    began = time.perf_counter()
    image_shape = run.train_source.image_shape
    state = new_train_state(run.config, run.model, run.optimizer, image_shape)
    state = jax.block_until_ready(attach_teacher(state, run.config, run.train_source.num_classes))
    run.progress.message(f"created the train state in {time.perf_counter() - began:.1f}s")
    return state


def restore_checkpoint(run: Run, state: TrainState) -> tuple[TrainState, dict[str, Any]] | None:
    """The state (shaped like ``state``) and meta of the workdir's newest checkpoint that passes its check; None if
    it has none. Damaged ones are set aside in ``corrupt_checkpoints/``.

    A workdir that holds a run of another model or data set is refused. So is one whose every checkpoint is damaged
    (now or at an earlier start): starting again at step 0 would silently throw the run away, so it takes
    ``start_over_if_corrupt=True``.
    """
    config, checkpoints = run.config, run.checkpoints

    def read(step: int) -> tuple[TrainState, dict[str, Any]]:
        meta = checkpoints.read_meta(step)
        if (meta["model"], meta["dataset"]) != (config.model, config.dataset):
            raise ValueError(
                f"{run.workdir} holds a run of {meta['model']} on {meta['dataset']}, not {config.model} on "
                f"{config.dataset}; choose another --workdir."
            )
        return checkpoints.restore(state, step)

    try:
        found = checkpoints.newest_readable(read, set_aside=True)
    except CorruptDataError:  # every one was damaged, and is now set aside: said below
        found = None
    set_aside = checkpoints.directory.parent / CORRUPT_FOLDER
    if found is None and set_aside.is_dir() and any(set_aside.iterdir()):
        if not config.get("start_over_if_corrupt", False):
            raise CorruptDataError(
                f"{run.workdir} has no readable checkpoint, only damaged ones (set aside in {set_aside}). Restore a "
                "copy of the checkpoints, or start the run over at step 0 with --config.start_over_if_corrupt=true."
            )
        run.progress.message(f"every checkpoint was damaged (kept in {set_aside}): starting over at step 0")
    return None if found is None else found[1]


def initial_state(run: Run) -> tuple[TrainState, Start]:
    """The run's state, placed on its devices, and where it starts: the workdir's latest readable checkpoint, or
    else a new state (holding the weights of ``init_from``, if the config names a run to start from)."""
    state = create_state(run)
    restored = restore_checkpoint(run, state)
    meta: dict[str, Any] = {}
    if restored is not None:
        state, meta = restored
        run.progress.message(f"resumed from step {int(state.step)} in {run.checkpoints.directory}")
    elif run.config.get("init_from"):
        state, note = transfer.init_from_checkpoint(state, run.config)
        run.progress.message(note)
    if not run.config.get("bn_update", True):
        state = state.replace(apply_fn=transfer.frozen_bn(run.model))
    start = Start(int(state.step), meta.get("elapsed_s", 0.0), meta.get("reached"), meta.get("test_metrics"))
    return run.steps.put_state(state), start


def single_copy(run: Run, state: TrainState) -> TrainState:
    """``state`` as a checkpoint holds it: pmap keeps one copy per device, of which one is saved."""
    return run.steps.to_host(state) if run.config.parallelism == "pmap" else state


def save_checkpoint(
    run: Run, step: int, state: TrainState, meta: dict[str, Any], test_accuracy: float | None = None
) -> None:
    """Start saving ``state`` as the checkpoint of ``step``, with ``meta`` (`run_meta`) and, where the step was
    evaluated, its ``test_accuracy``, which ranks it for keeping the best."""
    metrics = None if test_accuracy is None else {ACCURACY: test_accuracy}
    run.checkpoints.save(step, single_copy(run, state), meta, metrics, force=True)


def evaluate_state(steps: Steps, state: TrainState, source: data.Source, settings: data.BatchSettings) -> dict:
    """Loss and accuracy over every example of ``source`` (padded batches, masked)."""
    totals = None
    for batch in source.eval_batches(settings):
        sums = steps.to_host(steps.evaluate(state, steps.put_batch(batch)))
        totals = sums if totals is None else {k: totals[k] + v for k, v in sums.items()}
    return {"loss": float(totals["loss_sum"] / totals["count"]), "accuracy": float(totals["correct"] / totals["count"])}


def check_finite(records: list[dict[str, Any]], first_step: int, checkpoints: Checkpoints) -> None:
    """Stop on a non-finite loss or parameters (fp16 steps skipped by loss scaling excepted).

    Runs before every checkpoint, so the checkpoint it names as the last good one (saved by this run, or restored
    and checked against its digest) is finite.
    """
    for offset, record in enumerate(records):
        if record["finite"] < 1:
            good = checkpoints.last_good
            where = (
                f"step {good} in {checkpoints.directory} (left intact); training resumes from it"
                if good is not None
                else "none yet; training starts again at step 0"
            )
            raise FloatingPointError(
                f"Training diverged at step {first_step + offset + 1}: the loss (now {record['loss']}) or the "
                f"parameters are no longer finite. Last good checkpoint: {where}. Lower the learning rate, add "
                "warm-up or gradient clipping, and run again."
            )


class MetricsWindow:
    """The metrics of the train-step calls that the host has not fetched yet. They are fetched together, when
    the loop logs or checkpoints, so that the host does not wait for the devices at every step."""

    def __init__(self, run: Run, callbacks: Sequence[Callback]) -> None:
        self.run, self.callbacks = run, callbacks
        self.calls: list[Metrics] = []
        self.stop_requested = False  # by a callback

    def add(self, metrics: Metrics) -> None:
        self.calls.append(metrics)

    def fetch(self, done: int) -> list[dict[str, Any]]:
        """The metrics of the steps up to ``done``, one record per step, checked to be finite and shown to the
        callbacks; the window is then empty."""
        records = []
        for metrics in map(self.run.steps.to_host, self.calls):  # a call's metrics: one value per step it ran
            values = {k: np.atleast_1d(v) for k, v in metrics.items()}
            records += [{k: v[i] for k, v in values.items()} for i in range(len(values["loss"]))]
        self.calls = []
        first = done - len(records)
        check_finite(records, first, self.run.checkpoints)
        for offset, record in enumerate(records):
            for callback in self.callbacks:
                self.stop_requested |= bool(callback.on_train_step(first + offset + 1, record))
        return records


def next_stop(step: int, end: int, config: ml_collections.ConfigDict) -> int:
    """The first step after ``step`` at which the loop logs, evaluates, checkpoints or ends: a call of several
    steps must not run past it."""
    every = (config.log_every_steps, config.eval_every_steps, config.checkpoint_every_steps)
    return min([end] + [(step // n + 1) * n for n in every if n > 0])


def elapsed_s(run: Run, start: Start) -> float:
    """Wall time of the run: this process's, going on from its checkpoint's."""
    return start.elapsed_s + time.perf_counter() - run.began


def end_step(run: Run, start: Start) -> int:
    """Where training ends: ``num_train_steps``, or where it starts if its checkpoint reached the target already."""
    reached, target = start.reached, run.target_accuracy
    if target and reached and reached["test_accuracy"] >= target:
        run.progress.message(reached_message(reached, target, run.steps_per_epoch))
        return start.step
    return run.config.num_train_steps


def reached_message(reached: dict[str, float], target: float, steps_per_epoch: int) -> str:
    return (
        f"reached test accuracy {reached['test_accuracy']:.4f} >= {target} at step {reached['step']} (epoch "
        f"{reached['step'] / steps_per_epoch:.1f}) after {reached['elapsed_s']:.1f}s "
        f"({format_duration(reached['elapsed_s'])}) of this run, compiling and evaluating included"
    )


def announce(run: Run, feed: Feed) -> None:
    """One line saying what the run trains, on what, and how."""
    config, source = run.config, run.train_source
    run.progress.message(
        f"{config.model} on {config.dataset}: {source.num_examples:,} training images, batch "
        f"{config.batch_size}, {config.num_train_steps:,} steps ({config.num_train_steps / run.steps_per_epoch:.1f} "
        f"epochs), {jax.device_count()} {jax.devices()[0].platform} device(s) in {jax.process_count()} "
        f"process(es), {config.parallelism}"
        + (f" ({config.batch_parts})" if config.parallelism == "batch_parts" else "")
        + (f", data on the device, {feed.steps_per_call} step(s) per call" if config.data_on_device else "")
    )


def log_training(run: Run, log: MetricsLog, records: list[dict[str, Any]], step: int, elapsed: float) -> None:
    """The means of the steps' ``records`` since the last line, to metrics.jsonl and the progress line."""
    means = {k: float(np.mean([r[k] for r in records])) for k in records[0] if k != "finite"}
    log.write(step, "train", means | {"learning_rate": float(run.schedule(step - 1))}, elapsed)
    run.progress.update(step, {k: means[k] for k in ("loss", "accuracy")})


def evaluate_and_log(run: Run, log: MetricsLog, state: TrainState, step: int, elapsed: float) -> dict[str, float]:
    """The test metrics of ``state``, written to metrics.jsonl and shown; the img/s clock restarts after them."""
    metrics = evaluate_state(run.steps, state, run.test_source, run.batches)
    log.write(step, "test", metrics, elapsed)
    run.progress.message(f"step {step}: test loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.4f}")
    run.progress.start_timing(step)  # img/s counts training only
    return metrics


def reached_target(run: Run, test_metrics: dict[str, float], step: int, start: Start) -> dict[str, float] | None:
    """What the checkpoint of ``step`` records when its test accuracy reaches ``stop_at_test_accuracy``."""
    if not run.target_accuracy or test_metrics["accuracy"] < run.target_accuracy:
        return None
    return {"test_accuracy": test_metrics["accuracy"], "step": step, "elapsed_s": elapsed_s(run, start)}


def train_steps(
    run: Run,
    state: TrainState,
    start: Start,
    end: int,
    feed: Feed,
    log: MetricsLog,
    stop: StopSignals,
    callbacks: Sequence[Callback] = (),
) -> tuple[TrainState, dict[str, float]]:
    """Train from ``start.step`` to ``end``, logging, evaluating and checkpointing as the config says, until the
    end, the target accuracy, a callback or a signal stops it; the state and its last test metrics ({} if none)."""
    config = run.config
    window = MetricsWindow(run, callbacks)
    test_metrics: dict[str, float] = {}
    step = start.step
    if step < end:
        run.progress.compiled(feed.compile(state))
        run.progress.start_timing(step)
    while step < end:
        count = feed.steps_in_call(step, next_stop(step, end, config))
        state, metrics = feed(state, count)
        window.add(metrics)
        step += count
        if step % config.log_every_steps == 0 or step == end:
            log_training(run, log, window.fetch(step), step, elapsed_s(run, start))
        evaluated, reached, halt = step % config.eval_every_steps == 0 or step == end, None, False
        if evaluated:
            test_metrics = evaluate_and_log(run, log, state, step, elapsed_s(run, start))
            reached = reached_target(run, test_metrics, step, start)
            halt = any([bool(callback.on_evaluation(step, state, test_metrics)) for callback in callbacks])
        signum = stop.agreed()
        halt |= window.stop_requested
        run.checkpoints.check_saves(waiting=False)  # a save that failed in the background stops training here
        if step == end or reached or halt or signum is not None or run.checkpoints.manager.should_save(step):
            window.fetch(step)  # every step before a checkpoint is checked
            extra = ({"reached": reached} if reached else {}) | ({"test_metrics": test_metrics} if evaluated else {})
            meta = run_meta(config, step, elapsed_s(run, start), **extra)
            save_checkpoint(run, step, state, meta, test_metrics["accuracy"] if evaluated else None)
        if reached:
            run.progress.message(reached_message(reached, run.target_accuracy, run.steps_per_epoch))
            break
        if halt or window.stop_requested:
            run.progress.message(f"a callback stopped the run after step {step}; saved a checkpoint")
            break
        if signum is not None and step < end:  # the caller's `finally` waits for the checkpoint before this propagates
            raise TrainingInterruptedError(
                f"{signal.Signals(signum).name} received: stopped after step {step} and saved a checkpoint in "
                f"{run.checkpoints.directory}. Run the same command to resume.",
                signum,
            )
    return state, test_metrics


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | Path, callbacks: Sequence[Callback] = ()
) -> TrainResult:
    """Train ``config`` in ``workdir`` (resuming if it holds a checkpoint); return the final state and its test
    metrics.

    Raises `TrainingInterruptedError` after checkpointing when SIGTERM/SIGINT arrives (from the start: one that
    arrives while the run is prepared stops it before it trains), FloatingPointError on a non-finite loss,
    `resnet_jax.faults.WorkdirInUseError` if another run holds the workdir, and `resnet_jax.faults.StorageError`
    when a checkpoint cannot be written. Every check of the inputs happens before anything compiles.
    ``callbacks`` watch the steps and evaluations, and may stop the run early (`Callback`).
    """
    with StopSignals() as stop:
        run = prepare_run(config, workdir)
        stop.watch()
        try:
            return train_prepared(run, stop, callbacks)
        finally:
            close_run(run)


def train_prepared(run: Run, stop: StopSignals, callbacks: Sequence[Callback]) -> TrainResult:
    """`train_and_evaluate` once `prepare_run` has made ``run``: restore, train, evaluate, plot."""
    state, start = initial_state(run)
    if stop.received is not None:
        raise TrainingInterruptedError(
            f"{signal.Signals(stop.received).name} received before training began: nothing was trained or saved. "
            "Run the same command to start.",
            stop.received,
        )
    end = end_step(run, start)
    feed = create_feed(run.config, run.train_source, run.steps, run.mesh, start.step)
    log = MetricsLog(run.workdir, enabled=writes_files(), start_step=start.step)
    announce(run, feed)
    try:
        state, test_metrics = train_steps(run, state, start, end, feed, log, stop, callbacks)
    finally:
        run.checkpoints.close()  # waits for the last save: raises if it failed
        log.close()
    if not test_metrics:  # a finished run again: its checkpoint's metrics, else evaluate it
        test_metrics = start.test_metrics or evaluate_state(run.steps, state, run.test_source, run.batches)
    if writes_files():
        curves = plot_curves(run.workdir)
        run.progress.message(f"done in {format_duration(time.perf_counter() - run.began)}; curves in {curves}")
        print(f"final test_accuracy={test_metrics['accuracy']:.4f} test_loss={test_metrics['loss']:.4f}")
    return TrainResult(single_copy(run, state), test_metrics)


def close_run(run: Run) -> None:
    """Wait for the run's checkpoints to be written and release its workdir."""
    try:
        run.checkpoints.close()
    finally:
        run.lock.release()


def evaluate(workdir: str | Path, step: int | None = None) -> dict[str, float]:
    """Test metrics of the checkpoint at ``step`` (default: the latest) of the run in ``workdir``."""
    _, state, config = load_run(workdir, step)
    check_batch_sizes(config)
    test_source = data.load_run_source(config, config.eval_split)
    steps = compile_steps(make_mesh(), parallelism=config.parallelism, batch_parts=config.get("batch_parts", 1))
    metrics = evaluate_state(steps, steps.put_state(state), test_source, batch_settings(config))
    print(f"step {int(state.step)} test_accuracy={metrics['accuracy']:.4f} test_loss={metrics['loss']:.4f}")
    return metrics
