"""Post-training int8 quantization of a run (``resnet-jax quantize``).

Every conv's kernel becomes int8 with one scale per output channel, and its input gets one scale calibrated on the
first ``calibration_images`` images of the training split (unaugmented, normalised as in evaluation). The dense head
and batch norm stay float32: the head is under 1% of a CIFAR-style model's multiply-adds, and an eval-mode batch norm
is a per-channel affine map that a deployment folds into the conv before it. The result is a run folder whose
checkpoint ``eval``, ``predict`` and ``analyze`` read like any other: its config records the quantization settings
(``config.quantize``), which make `resnet_jax.train.runs.build_model` build the model with `QuantizedConv`.

Quantization-aware fine-tuning (``--qat-steps``) recovers what rounding loses: before the weights are quantized,
the float run trains a few hundred more steps with its convs' inputs and kernels rounded to int8 in the forward pass
(straight-through gradients; `FakeQuantConv`), so that the weights settle where rounding costs least.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from resnet_jax import data
from resnet_jax.compress.layers import ARITHMETICS, CALIBRATION_INPUT, CalibratingConv
from resnet_jax.compress.numerics import CALIBRATIONS, INT8_MAX, TINY, calibrated_absmax, channel_scales, quantize
from resnet_jax.models import ResNet
from resnet_jax.train.checkpoint import Checkpoints
from resnet_jax.train.loop import train_and_evaluate
from resnet_jax.train.runs import batch_settings, load_run, run_meta
from resnet_jax.train.steps import TrainState

CALIBRATION_BATCH = 64
SAMPLE_PER_BATCH = 1 << 16  # magnitudes of each layer's input kept per batch, for percentile and MSE calibration


def quantization_settings(
    calibration: str = "percentile", calibration_images: int = 512, percentile: float = 99.99, arithmetic: str = "int8"
) -> ml_collections.ConfigDict:
    """The settings a quantized run records as ``config.quantize``, checked."""
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration={calibration!r}; choose one of {CALIBRATIONS}.")
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"arithmetic={arithmetic!r}; choose one of {ARITHMETICS}.")
    if calibration_images < 1:
        raise ValueError(f"calibration_images={calibration_images}; give a positive number of images, e.g. 512.")
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile={percentile}; give a percentile of |x| in (50, 100], e.g. 99.99.")
    return ml_collections.ConfigDict(
        {
            "weights": "int8 per output channel, symmetric",
            "calibration": calibration,
            "calibration_images": calibration_images,
            "percentile": percentile,
            "arithmetic": arithmetic,
        }
    )


def calibration_batches(source: data.Source, config: ml_collections.ConfigDict, count: int) -> Iterator[np.ndarray]:
    """The first ``count`` images of ``source`` in batches, as evaluation normalises them (no augmentation)."""
    settings = dataclasses.replace(batch_settings(config), eval_batch_size=CALIBRATION_BATCH)
    for batch in itertools.islice(source.eval_batches(settings), -(-count // CALIBRATION_BATCH)):
        images = batch["image"][batch["mask"] > 0][:count]  # the last batch is padded
        count -= len(images)
        yield images


def input_scales(
    model: ResNet, variables: dict[str, Any], batches: Iterator[np.ndarray], settings: ml_collections.ConfigDict
) -> dict[tuple[str, ...], float]:
    """The input scale of every conv of ``model`` (by its module path), calibrated on ``batches`` of images."""
    calibrating = model.clone(conv=CalibratingConv)
    forward = jax.jit(lambda images: calibrating.apply(variables, images, train=False, mutable=["intermediates"])[1])
    largest: dict[tuple[str, ...], float] = {}
    samples: dict[tuple[str, ...], list[np.ndarray]] = {}
    for images in batches:
        recorded = traverse_util.flatten_dict(jax.device_get(forward(images))["intermediates"])
        for path, (inputs,) in recorded.items():
            if path[-1] != CALIBRATION_INPUT:
                continue
            magnitudes = np.abs(inputs).ravel()
            layer = path[:-1]
            largest[layer] = max(largest.get(layer, 0.0), float(magnitudes.max()))
            stride = max(1, len(magnitudes) // SAMPLE_PER_BATCH)
            samples.setdefault(layer, []).append(magnitudes[::stride])
    if not largest:
        raise ValueError("No calibration images: the training split is empty.")
    scales = {}
    for layer, parts in samples.items():
        if settings.calibration == "minmax":  # of every value, not of the sample
            absmax = largest[layer]
        else:
            absmax = calibrated_absmax(np.concatenate(parts), settings.calibration, settings.percentile)
        scales[layer] = max(absmax, TINY) / INT8_MAX
    return scales


def quantized_params(params: dict[str, Any], scales: dict[tuple[str, ...], float]) -> dict[str, Any]:
    """``params`` with the kernel of every conv in ``scales`` as int8, with its channel scales and input scale."""
    flat = traverse_util.flatten_dict(jax.device_get(params))
    for layer, scale in scales.items():
        kernel = flat[(*layer, "kernel")]
        kernel_scale = channel_scales(kernel)
        flat[(*layer, "kernel")] = np.asarray(quantize(kernel, kernel_scale))
        flat[(*layer, "kernel_scale")] = np.asarray(kernel_scale, np.float32)
        flat[(*layer, "input_scale")] = np.asarray(scale, np.float32)
    return traverse_util.unflatten_dict(flat)


def check_quantizable(state: TrainState, config: ml_collections.ConfigDict, checkpoint: str | Path) -> None:
    """Refuse a run that is already quantized or whose weights are not finite (a diverged run)."""
    if config.get("quantize") is not None:
        raise ValueError(f"{checkpoint} is already quantized; quantize the float run it was made from.")
    if config.get("lowrank") is not None:  # its factorised convs have no quantized form
        raise ValueError(
            f"{checkpoint} is a low-rank run, whose factorised convs int8 quantization does not cover; quantize a "
            "run with whole convs (e.g. the one it was factorised from)."
        )
    finite = all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves((state.params, state.batch_stats)))
    if not finite:
        raise ValueError(f"{checkpoint} holds non-finite weights (a diverged run); quantize a run that trained.")


def quantize_run(
    checkpoint: str | Path,
    out: str | Path,
    settings: ml_collections.ConfigDict,
    step: int | None = None,
    qat_steps: int = 0,
) -> dict[str, Any]:
    """Write the int8 quantization of ``checkpoint`` (step ``step``, default latest) as a run folder ``out``, after
    ``qat_steps`` of quantization-aware fine-tuning in OUT/qat (none: post-training quantization alone); returns
    the meta of its checkpoint."""
    out = Path(out)
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise ValueError(f"{out} already holds checkpoints; choose a new --out folder.")
    if qat_steps < 0:
        raise ValueError(f"qat_steps={qat_steps}; give 0 (post-training quantization alone) or more steps.")
    model, state, config = load_run(checkpoint, step)
    check_quantizable(state, config, checkpoint)
    source = data.load_run_source(config, config.train_split)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    scales = input_scales(model, variables, calibration_batches(source, config, settings.calibration_images), settings)
    if qat_steps:
        state = quantization_aware_fine_tune(state, config, scales, out / "qat", qat_steps)
    quantized_config = config.copy_and_resolve_references()
    quantized_config.quantize = settings.copy_and_resolve_references()
    quantized_config.quantize.qat_steps = qat_steps
    quantized = TrainState.create(
        apply_fn=None,
        params=quantized_params(state.params, scales),
        batch_stats=jax.device_get(state.batch_stats),
        tx=state.tx,
    ).replace(step=state.step, loss_scale=state.loss_scale)
    meta = run_meta(quantized_config, int(state.step)) | {
        "num_classes": model.num_classes,
        "image_shape": list(source.image_shape),
        "quantized_from": str(Path(checkpoint).resolve()),
    }
    save_as_run(out, quantized, meta)
    return meta


def quantization_aware_fine_tune(
    state: TrainState,
    config: ml_collections.ConfigDict,
    scales: dict[tuple[str, ...], float],
    folder: Path,
    steps: int,
) -> TrainState:
    """``state`` trained ``steps`` more steps with every conv's input and kernel rounded to int8 in the forward
    pass (`FakeQuantConv`, input scales fixed as calibrated), in the run folder ``folder`` (resumable), on the tail
    of the run's own learning-rate schedule stretched by ``steps``."""
    config = config.copy_and_resolve_references()
    config.quantize = ml_collections.ConfigDict(
        {"arithmetic": "fake", "input_scales": tuple(sorted(("/".join(path), s) for path, s in scales.items()))}
    )
    config.num_train_steps = int(state.step) + steps
    if not (folder / "checkpoints").is_dir():
        save_as_run(folder, state, run_meta(config, int(state.step)))
    train_and_evaluate(config, folder)
    return load_run(folder)[1]


def save_as_run(folder: Path, state: TrainState, meta: dict[str, Any]) -> None:
    checkpoints = Checkpoints(folder, every_steps=1, keep_latest=1, async_save=False)
    checkpoints.save(int(state.step), state, meta, force=True)
    checkpoints.close()
