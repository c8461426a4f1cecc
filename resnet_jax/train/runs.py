"""A run as its config and checkpoints describe it: the model a config builds, the batches it draws, the checks
of a config made before anything loads or compiles, what a checkpoint records about its run, and reading a run
back from its workdir.

The training loop builds on this module; transfer learning, inference, analysis and bench read runs through it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from resnet_jax import data
from resnet_jax.compress.layers import compressed_conv
from resnet_jax.compress.prune import attach_pruning, prune_schedule
from resnet_jax.cpu.conv import model_conv
from resnet_jax.cpu.processes import available_cores
from resnet_jax.faults import CorruptDataError
from resnet_jax.models import ResNet, create_model
from resnet_jax.train.checkpoint import Checkpoints
from resnet_jax.train.config import read_saved_config
from resnet_jax.train.optim import create_optimizer, learning_rate_schedule
from resnet_jax.train.steps import TrainState, create_train_state


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> ResNet:
    """The model of ``config`` (its name, dtype and attribute overrides) for ``num_classes`` classes, with the
    convolution this backend and parallelism run fastest (`resnet_jax.cpu.conv.model_conv`), or the quantized one of
    a quantized run (`resnet_jax.compress.layers.compressed_conv`)."""
    conv = model_conv(jax.default_backend(), config.parallelism, config.get("batch_parts", 1), len(available_cores()))
    conv = compressed_conv(config, conv)
    return create_model(config.model, num_classes=num_classes, dtype=config.dtype, conv=conv, **config.model_overrides)


def new_train_state(
    config: ml_collections.ConfigDict, model: ResNet, tx: optax.GradientTransformation, image_shape: tuple[int, ...]
) -> TrainState:
    """The train state a run of ``config`` starts from: ``model`` initialised from the config's seed, with the
    pruning masks and schedule of ``config.prune`` where it prunes (`resnet_jax.compress.prune`)."""
    return attach_pruning(create_train_state(model, tx, tuple(image_shape), config.seed), config)


def batch_settings(config: ml_collections.ConfigDict) -> data.BatchSettings:
    """The batches of ``config`` as this process draws them: the one place a config's data keys become settings."""
    return data.BatchSettings(
        batch_size=config.batch_size,
        eval_batch_size=config.eval_batch_size,
        seed=config.seed,
        augment=config.augment,
        crop_padding=config.crop_padding,
        random_flip=config.random_flip,
        random_erasing=config.random_erasing,
        mixup_alpha=config.mixup_alpha,
        image_size=config.get("image_size"),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def check_config(config: ml_collections.ConfigDict) -> None:
    """Everything about ``config`` that can be checked without its data, so that a mistake fails before anything
    loads, compiles or writes a file. `check_feed` checks the rest once the data is loaded."""
    check_numbers(config)
    check_batch_sizes(config)
    check_target_accuracy(config)
    check_steps_per_call(config)
    prune_schedule(config)  # checks its values
    data.run_normalisation(config)  # checks its values
    batch_settings(config)  # checks its values


# The valid range of each numeric key, as a test and in words. Counts must be whole numbers, and every value finite.
COUNTS = ("num_train_steps", "log_every_steps", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints")
WHOLE_NUMBERS = (*COUNTS, "warmup_steps", "crop_padding", "seed")
RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    **{key: (lambda v: v >= 1, "a whole number >= 1") for key in COUNTS},
    "learning_rate": (lambda v: v > 0, "a number > 0, e.g. 0.1"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1), e.g. 0.9"),
    "weight_decay": (lambda v: v >= 0, ">= 0, e.g. 1e-4"),
    "grad_clip_norm": (lambda v: v >= 0, ">= 0 (0: no clipping)"),
    "label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "lr_decay_factor": (lambda v: v > 0, "a number > 0, e.g. 0.1"),
    "warmup_steps": (lambda v: v >= 0, "a whole number >= 0"),
    "warmup_start_learning_rate": (lambda v: v >= 0, ">= 0"),
    "random_erasing": (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    "mixup_alpha": (lambda v: v >= 0, ">= 0 (0: no mixup)"),
    "crop_padding": (lambda v: v >= 0, "a whole number >= 0 (0: no cropping)"),
    "seed": (lambda v: 0 <= v < 2**32, "a whole number in [0, 2**32)"),
}
DTYPES = ("float32", "bfloat16", "float16")


def check_numbers(config: ml_collections.ConfigDict) -> None:
    """Every numeric key of ``config`` in its valid range (`RANGES`), and ``dtype`` one of `DTYPES`: checked before
    anything loads, since a zero interval or a negative learning rate fails only later, or trains to nonsense."""
    for key, (valid, words) in RANGES.items():
        if key not in config:
            continue
        value = config[key]
        number = isinstance(value, int) or (isinstance(value, float) and key not in WHOLE_NUMBERS)
        if isinstance(value, bool) or not number or not math.isfinite(value) or not valid(value):
            raise ValueError(f"{key}={value!r} is out of range: give {words} (--config.{key}=VALUE).")
    if config.get("dtype", "float32") not in DTYPES:
        raise ValueError(f"dtype={config.dtype!r} is not a training dtype: give one of {', '.join(DTYPES)}.")


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


def check_target_accuracy(config: ml_collections.ConfigDict) -> float:
    """``stop_at_test_accuracy``: 0 (train every step) or the test accuracy at which to stop, checked up front."""
    target = config.get("stop_at_test_accuracy", 0.0)
    if not 0.0 <= target <= 1.0:
        raise ValueError(
            f"stop_at_test_accuracy={target} is not an accuracy: give a fraction such as 0.94, or 0 to train "
            "every step."
        )
    return target


def check_steps_per_call(config: ml_collections.ConfigDict) -> None:
    """``steps_per_call`` > 1 runs several steps on batches made on the device."""
    per_call = config.steps_per_call
    if per_call < 1:
        raise ValueError(f"steps_per_call={per_call}: give the train steps per compiled call, e.g. 10 (1: one each).")
    if per_call > 1 and not config.data_on_device:
        raise ValueError(
            f"steps_per_call={per_call} runs steps on batches made on the device: add --config.data_on_device=True."
        )


def check_feed(config: ml_collections.ConfigDict, source: data.Source) -> None:
    """The training ``source`` can make the config's batches, on the device where ``data_on_device`` asks for it:
    checked before anything compiles."""
    source.check_settings(batch_settings(config))
    if not config.data_on_device:
        return
    problems = [
        f"parallelism={config.parallelism!r} (use jit)" if config.parallelism != "jit" else "",
        f"{source.name} is streamed, not held in memory" if not source.in_memory else "",
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


def load_run(workdir: str | Path, step: int | None = None) -> tuple[ResNet, TrainState, ml_collections.ConfigDict]:
    """The model, train state and config of the checkpoint at ``step`` of a run, checked against its digest.

    Without ``step``, the newest checkpoint that passes the check: a damaged one is skipped with a warning (and
    left in place: reading a run changes nothing in it). A damaged ``step`` raises `CorruptDataError`.
    """
    checkpoints = open_run(workdir)
    try:
        if step is None:
            return checkpoints.newest_readable(lambda newest: _load_step(checkpoints, newest), set_aside=False)[1]
        try:
            return _load_step(checkpoints, step)
        except CorruptDataError as error:
            raise CorruptDataError(
                f"{error}; choose another of its steps with --step (kept: {checkpoints.steps()})"
            ) from None
    finally:
        checkpoints.close()


def open_run(workdir: str | Path) -> Checkpoints:
    """A run's checkpoints, read-only; FileNotFoundError when it has none. The caller closes them."""
    checkpoints = Checkpoints(workdir, every_steps=1, keep_latest=1, async_save=False, read_only=True)
    if not checkpoints.steps():
        checkpoints.close()
        raise FileNotFoundError(f"No checkpoint in {checkpoints.directory}; train first with `resnet-jax train`.")
    return checkpoints


def run_config(workdir: str | Path, step: int | None = None) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """The config and checkpoint meta of a run's step (default: the latest), read without loading its weights."""
    checkpoints = open_run(workdir)
    try:
        meta = checkpoints.read_meta(step)
    finally:
        checkpoints.close()
    return read_saved_config(meta["config"]), meta


def _load_step(checkpoints: Checkpoints, step: int) -> tuple[ResNet, TrainState, ml_collections.ConfigDict]:
    meta = checkpoints.read_meta(step)
    config = read_saved_config(meta["config"])
    num_classes, image_shape = meta.get("num_classes"), meta.get("image_shape")
    if num_classes is None or image_shape is None:  # a training run: its data set says (converted ones record them)
        source = data.load_run_source(config, config.eval_split)
        num_classes, image_shape = source.num_classes, source.image_shape
    model = build_model(config, num_classes)
    tx = create_optimizer(config, learning_rate_schedule(config, steps_per_epoch=1))  # fixes the state's structure
    abstract = jax.eval_shape(lambda: new_train_state(config, model, tx, tuple(image_shape)))
    state, _ = checkpoints.restore(abstract, step)
    return model, state, config
