"""``train_and_evaluate`` and ``evaluate``: the whole job, importable from a notebook.

A run lives in its workdir: checkpoints/, metrics.jsonl, tensorboard/ and curves.png. Starting
again on the same workdir resumes from the latest readable checkpoint, with the data stream at the
same example, so that a run killed at any moment and restarted ends with the same parameters.
SIGTERM or SIGINT (preemption, Ctrl-C) finishes the current step, saves a checkpoint and stops.
With ``stop_at_test_accuracy`` set, the run stops at the first evaluation that reaches it: a time-to-accuracy
measurement, read from the ``elapsed_s`` of metrics.jsonl (wall time of the run, across resumptions).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from resnet_jax import data
from resnet_jax.cpu.conv import model_conv
from resnet_jax.cpu.processes import available_cores
from resnet_jax.models import ResNet, create_model
from resnet_jax.train import distributed
from resnet_jax.train.checkpoint import ACCURACY, Checkpoints
from resnet_jax.train.config import read_saved_config
from resnet_jax.train.feed import DeviceFeed, HostFeed
from resnet_jax.train.optim import create_optimizer, learning_rate_schedule
from resnet_jax.train.reporting import MetricsLog, Progress, format_duration, plot_curves
from resnet_jax.train.steps import Steps, TrainState, compile_steps, create_train_state, make_mesh


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
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

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


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> ResNet:
    conv = model_conv(jax.default_backend(), config.parallelism, config.get("batch_parts", 1), len(available_cores()))
    return create_model(config.model, num_classes=num_classes, dtype=config.dtype, conv=conv, **config.model_overrides)


def check_batch_sizes(config: ml_collections.ConfigDict) -> None:
    """Both batch sizes must split evenly over the devices (and processes, or batch parts) before anything
    compiles."""
    devices, processes = jax.device_count(), jax.process_count()
    parts = config.batch_parts if config.parallelism == "batch_parts" else 1
    multiple = np.lcm.reduce([devices, processes, max(parts, 1)])
    for key in ("batch_size", "eval_batch_size"):
        size = config[key]
        if size < 1 or size % multiple:
            over = f"{devices} devices ({processes} processes)" + (f" and {parts} batch parts" if parts > 1 else "")
            raise ValueError(
                f"{key}={size} does not divide over {over}; use a multiple of {multiple}, e.g. "
                f"--config.{key}={max(1, size // multiple) * multiple}."
            )


def batch_draws(config: ml_collections.ConfigDict, start_step: int = 0) -> dict[str, Any]:
    """The config's choice of training examples, crops and flips from ``start_step`` on: the keywords of
    `data.train_draws`, which `train_batches` and `DeviceFeed` take too."""
    return {
        "global_batch_size": config.batch_size,
        "seed": config.seed,
        "start_step": start_step,
        "augment": config.augment,
        "pad": config.crop_padding,
        "flip": config.random_flip,
    }


def training_batches(config: ml_collections.ConfigDict, source: Any, start_step: int = 0) -> Any:
    """This process's training batches from ``start_step`` on, augmented as the config says."""
    return data.train_batches(
        source,
        **batch_draws(config, start_step),
        random_erasing=config.random_erasing,
        mixup_alpha=config.mixup_alpha,
        image_size=config.get("image_size"),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def check_feed(config: ml_collections.ConfigDict, source: data.ArraySource | data.StreamSource) -> None:
    """``data_on_device`` and ``steps_per_call`` can train this run: checked before anything compiles."""
    per_call, on_device = config.steps_per_call, config.data_on_device
    if per_call < 1:
        raise ValueError(f"steps_per_call={per_call}: give the train steps per compiled call, e.g. 10 (1: one each).")
    if not on_device:
        if per_call > 1:
            raise ValueError(
                f"steps_per_call={per_call} runs steps on batches made on the device: add --config.data_on_device=True."
            )
        return
    problems = [
        f"parallelism={config.parallelism!r} (use jit)" if config.parallelism != "jit" else "",
        f"{source.name} is streamed, not held in memory" if isinstance(source, data.StreamSource) else "",
        "random_erasing" if config.random_erasing else "",
        "mixup_alpha" if config.mixup_alpha else "",
        "image_size" if config.get("image_size") is not None else "",
    ]
    if any(problems):
        raise ValueError(
            "data_on_device=True makes batches on the device by random crop and flip alone, for an in-memory data set "
            f"under jit; this run has: {', '.join(p for p in problems if p)}. Change those, or set "
            "--config.data_on_device=False (the host pipeline does all of it)."
        )


def create_feed(
    config: ml_collections.ConfigDict, source: Any, steps: Steps, mesh: Mesh, start_step: int
) -> HostFeed | DeviceFeed:
    """The run's batches from ``start_step`` on: from the host pipeline, or made on the devices."""
    if not config.data_on_device:
        return HostFeed(steps, training_batches(config, source, start_step))
    return DeviceFeed(
        mesh,
        source,
        **batch_draws(config, start_step),
        steps_per_call=config.steps_per_call,
        label_smoothing=config.label_smoothing,
    )


def next_stop(step: int, end: int, config: ml_collections.ConfigDict) -> int:
    """The first step after ``step`` at which the loop logs, evaluates, checkpoints or ends: a call of several
    steps must not run past it."""
    every = (config.log_every_steps, config.eval_every_steps, config.checkpoint_every_steps)
    return min([end] + [(step // n + 1) * n for n in every if n > 0])


def use_compilation_cache(directory: str) -> None:
    """Keep compiled programs in ``directory`` (JAX's persistent compilation cache; a local path or a bucket),
    so that a restarted or repeated run loads its steps instead of compiling them again. "" leaves it off."""
    if directory and os.path.expanduser(directory) != jax.config.jax_compilation_cache_dir:
        from jax.experimental.compilation_cache import compilation_cache

        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        compilation_cache.reset_cache()  # JAX decides once whether to use it: at the first compile of the process


def check_target_accuracy(config: ml_collections.ConfigDict) -> float:
    """``stop_at_test_accuracy``: 0 (train every step) or the test accuracy at which to stop, checked up front."""
    target = config.get("stop_at_test_accuracy", 0.0)
    if not 0.0 <= target <= 1.0:
        raise ValueError(
            f"stop_at_test_accuracy={target} is not an accuracy: give a fraction such as 0.94, or 0 to train "
            "every step."
        )
    return target


def run_meta(config: ml_collections.ConfigDict, step: int, elapsed_s: float = 0.0, **extra: Any) -> dict[str, Any]:
    """What a checkpoint says about its run.

    The input pipeline and every random draw are functions of (seed, step), so the step is the data
    iterator's position and the seed is every random key: nothing else is needed to resume exactly.
    ``elapsed_s`` (wall time of the run so far) lets a resumed run go on counting.
    """
    return {
        "model": config.model,
        "dataset": config.dataset,
        "step": step,
        "data_position": step,
        "seed": config.seed,
        "elapsed_s": elapsed_s,
        "config": config.to_dict(),
        **extra,
    }


def evaluate_state(steps: Steps, state: TrainState, source: Any, config: ml_collections.ConfigDict) -> dict:
    """Loss and accuracy over every example of ``source`` (padded batches, masked)."""
    totals = None
    batches = data.eval_batches(
        source,
        batch_size=config.eval_batch_size,
        image_size=config.get("image_size"),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    for batch in batches:
        sums = steps.fetch(steps.evaluate(state, steps.put_batch(batch)))
        totals = sums if totals is None else {k: totals[k] + v for k, v in sums.items()}
    return {"loss": float(totals["loss_sum"] / totals["count"]), "accuracy": float(totals["correct"] / totals["count"])}


def check_finite(records: list[dict[str, float]], first_step: int, checkpoints: Checkpoints) -> None:
    """Stop on a non-finite loss or parameters (fp16 steps skipped by loss scaling excepted).

    Runs before every checkpoint, so the checkpoint it names as the last good one is finite.
    """
    for offset, record in enumerate(records):
        if record["finite"] < 1:
            last = checkpoints.latest_step()
            where = f"step {last} in {checkpoints.directory} (left intact)" if last is not None else "none yet"
            raise FloatingPointError(
                f"Training diverged at step {first_step + offset + 1}: the loss (now {record['loss']}) or the "
                f"parameters are no longer finite. Last good checkpoint: "
                f"{where}. Lower the learning rate, add warm-up or gradient clipping, and run again: training "
                "resumes from that checkpoint."
            )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, float]:
    """Train ``config`` in ``workdir`` (resuming if it holds a checkpoint); return the final test metrics.

    Raises `TrainingInterruptedError` after checkpointing when SIGTERM/SIGINT arrives, and FloatingPointError on a
    non-finite loss. Every check of the inputs happens before anything compiles.
    """
    from resnet_jax.train import transfer  # imported here: it builds on this module

    began = time.perf_counter()
    workdir = Path(workdir)
    distributed.initialize(config)
    use_compilation_cache(config.get("compilation_cache_dir", ""))
    lead = jax.process_index() == 0
    check_batch_sizes(config)
    target = check_target_accuracy(config)
    train_source = data.load_source(config.dataset, config.train_split, config.data_dir)
    test_source = data.load_source(config.dataset, config.eval_split, config.data_dir)
    check_feed(config, train_source)
    model = build_model(config, train_source.num_classes)
    steps_per_epoch = data.steps_per_epoch(train_source.num_examples, config.batch_size)
    schedule = learning_rate_schedule(config, steps_per_epoch)
    tx = create_optimizer(config, schedule)
    mesh = make_mesh()
    steps = compile_steps(mesh, config.label_smoothing, config.parallelism, config.batch_parts)

    checkpoints = Checkpoints(workdir, every_steps=config.checkpoint_every_steps, keep_latest=config.keep_checkpoints)
    progress = Progress(config.num_train_steps, 0, config.batch_size, enabled=lead)
    init_began = time.perf_counter()
    state = jax.block_until_ready(create_train_state(model, tx, train_source.image_shape, config.seed))
    progress.message(f"created the train state in {time.perf_counter() - init_began:.1f}s")

    def same_run(meta: dict) -> None:
        if (meta["model"], meta["dataset"]) != (config.model, config.dataset):
            raise ValueError(
                f"{workdir} holds a run of {meta['model']} on {meta['dataset']}, not {config.model} on "
                f"{config.dataset}; choose another --workdir."
            )

    restored = checkpoints.restore_latest_valid(state, same_run)
    meta = restored[1] if restored is not None else {}
    if restored is not None:
        state = restored[0]
        progress.message(f"resumed from step {int(state.step)} in {checkpoints.directory}")
    elif config.get("init_from"):
        state, note = transfer.init_from_checkpoint(state, config)
        progress.message(note)
    if not config.get("bn_update", True):
        state = state.replace(apply_fn=transfer.frozen_bn(model))
    state = steps.put_state(state)
    start = int(restored[0].step) if restored else 0
    end, reached = config.num_train_steps, meta.get("reached")  # a run stopped at its target says where
    if target and reached and reached["test_accuracy"] >= target:
        end = start  # stopped there before: nothing to train
        progress.message(reached_message(reached, target, steps_per_epoch))
    else:
        reached = None
    elapsed_before = meta.get("elapsed_s", 0.0)

    def elapsed() -> float:  # wall time of the run, going on from the checkpoint's
        return elapsed_before + time.perf_counter() - began

    feed = create_feed(config, train_source, steps, mesh, start)
    log = MetricsLog(workdir, enabled=lead, start_step=start)
    progress.message(
        f"{config.model} on {config.dataset}: {train_source.num_examples:,} training images, batch "
        f"{config.batch_size}, {config.num_train_steps:,} steps ({config.num_train_steps / steps_per_epoch:.1f} "
        f"epochs), {jax.device_count()} {jax.devices()[0].platform} device(s) in {jax.process_count()} "
        f"process(es), {config.parallelism}"
        + (f" ({config.batch_parts})" if config.parallelism == "batch_parts" else "")
        + (f", data on the device, {feed.steps_per_call} step(s) per call" if isinstance(feed, DeviceFeed) else "")
    )

    def saveable(state: TrainState) -> TrainState:  # pmap keeps one copy per device: save one
        return steps.fetch(state) if config.parallelism == "pmap" else state

    def checked(window: list[dict[str, jax.Array]], done: int) -> list[dict[str, float]]:
        """The metrics of the steps up to ``done``, one record per step, fetched and checked to be finite."""
        records = []
        for metrics in map(steps.fetch, window):  # a call's metrics: one value per step it ran
            values = {k: np.atleast_1d(v) for k, v in metrics.items()}
            records += [{k: v[i] for k, v in values.items()} for i in range(len(values["loss"]))]
        check_finite(records, done - len(records), checkpoints)
        return records

    test_metrics: dict[str, float] = {}
    window: list[dict[str, jax.Array]] = []
    step = start
    try:
        with StopSignals() as stop:
            if start < end:
                progress.compiled(feed.compile(state))
                progress.start_timing(start)
            while step < end:
                count = feed.steps_in_call(step, next_stop(step, end, config))
                state, metrics = feed(state, count)
                window.append(metrics)
                done = step = step + count
                if done % config.log_every_steps == 0 or done == end:
                    records, window = checked(window, done), []
                    means = {k: float(np.mean([r[k] for r in records])) for k in records[0] if k != "finite"}
                    log.write(done, "train", means | {"learning_rate": float(schedule(done - 1))}, elapsed())
                    progress.update(done, {k: means[k] for k in ("loss", "accuracy")})
                evaluated = done % config.eval_every_steps == 0 or done == end
                if evaluated:
                    test_metrics = evaluate_state(steps, state, test_source, config)
                    log.write(done, "test", test_metrics, elapsed())
                    progress.message(
                        f"step {done}: test loss {test_metrics['loss']:.4f}, accuracy {test_metrics['accuracy']:.4f}"
                    )
                    progress.start_timing(done)  # img/s counts training only
                    if target and test_metrics["accuracy"] >= target:
                        reached = {"test_accuracy": test_metrics["accuracy"], "step": done, "elapsed_s": elapsed()}
                signum = stop.agreed()
                if done == end or reached or signum is not None or checkpoints.manager.should_save(done):
                    checked(window, done)  # every step before a checkpoint is checked
                    window = []
                    meta = run_meta(config, done, elapsed(), **({"reached": reached} if reached else {}))
                    metrics = {ACCURACY: test_metrics["accuracy"]} if evaluated else None
                    checkpoints.save(done, saveable(state), meta, metrics, force=True)
                if reached:
                    progress.message(reached_message(reached, target, steps_per_epoch))
                    break
                if signum is not None:  # `finally` waits for the checkpoint before this propagates
                    name = signal.Signals(signum).name
                    raise TrainingInterruptedError(
                        f"{name} received: stopped after step {done} and saved a checkpoint in "
                        f"{checkpoints.directory}. Run the same command to resume.",
                        signum,
                    )
    finally:
        checkpoints.close()
        log.close()

    if not test_metrics:  # resumed a finished run: evaluate it again
        test_metrics = evaluate_state(steps, state, test_source, config)
    if lead:
        curves = plot_curves(workdir)
        progress.message(f"done in {format_duration(time.perf_counter() - began)}; curves in {curves}")
        print(f"final test_accuracy={test_metrics['accuracy']:.4f} test_loss={test_metrics['loss']:.4f}")
    return test_metrics


def reached_message(reached: dict[str, float], target: float, steps_per_epoch: int) -> str:
    return (
        f"reached test accuracy {reached['test_accuracy']:.4f} >= {target} at step {reached['step']} (epoch "
        f"{reached['step'] / steps_per_epoch:.1f}) after {reached['elapsed_s']:.1f}s "
        f"({format_duration(reached['elapsed_s'])}) of this run, compiling and evaluating included"
    )


def load_run(workdir: str | Path, step: int | None = None) -> tuple[ResNet, TrainState, ml_collections.ConfigDict]:
    """The model, train state and config of the checkpoint at ``step`` (default: the latest) of a run."""
    checkpoints = Checkpoints(workdir, every_steps=1, keep_latest=1, async_save=False)
    if checkpoints.latest_step() is None:
        raise FileNotFoundError(f"No checkpoint in {checkpoints.directory}; train first with `resnet-jax train`.")
    meta = checkpoints.read_meta(step)
    config = read_saved_config(meta["config"])
    num_classes, image_shape = meta.get("num_classes"), meta.get("image_shape")
    if num_classes is None or image_shape is None:  # a training run: its data set says (converted ones record them)
        source = data.load_source(config.dataset, config.eval_split, config.data_dir)
        num_classes, image_shape = source.num_classes, source.image_shape
    model = build_model(config, num_classes)
    tx = create_optimizer(config, learning_rate_schedule(config, steps_per_epoch=1))  # fixes the state's structure
    abstract = jax.eval_shape(lambda: create_train_state(model, tx, tuple(image_shape), config.seed))
    state, _ = checkpoints.restore(abstract, step)
    checkpoints.close()
    return model, state, config


def evaluate(workdir: str | Path, step: int | None = None) -> dict[str, float]:
    """Test metrics of the checkpoint at ``step`` (default: the latest) of the run in ``workdir``."""
    _, state, config = load_run(workdir, step)
    check_batch_sizes(config)
    test_source = data.load_source(config.dataset, config.eval_split, config.data_dir)
    steps = compile_steps(make_mesh(), parallelism=config.parallelism, batch_parts=config.get("batch_parts", 1))
    metrics = evaluate_state(steps, steps.put_state(state), test_source, config)
    print(f"step {int(state.step)} test_accuracy={metrics['accuracy']:.4f} test_loss={metrics['loss']:.4f}")
    return metrics
