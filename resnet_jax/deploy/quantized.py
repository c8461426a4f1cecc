"""Exporting a quantized run (``resnet-jax quantize``): its own int8 weights, not a float model rebuilt from them.

A quantized run's convs are `resnet_jax.compress.layers.QuantizedConv`: int8 kernels with a scale per output
channel, and inputs rounded to int8 with a calibrated scale. Formats differ in what they can carry:

- stablehlo and savedmodel carry the run's program as it is: int8 kernels and input scales, integer convolutions
  (int8 x int8 into int32), the batch norm unfolded after each conv. Their logits equal the JAX model's.
- tflite_int8 quantizes anew, so it gets the run's kernels dequantized (each int8 value times its channel's scale,
  exactly on its grid) in a plain-conv model, batch norm folded as for any run. Folding scales each output channel
  by one number, so the converter's per-channel symmetric quantization (the channel's largest |w| to 127) finds the
  run's integers again, negated in a channel whose batch norm scale is negative. The activation ranges are the
  converter's own, calibrated on the representative images (asymmetric, with a zero point), not the run's input
  scales, and the dense head, float32 in the run, is quantized too.
- tflite (float32) and onnx are refused: the quantized convs written in float ops (round, clip, cast) convert and
  run, but their runtimes order the float arithmetic before each rounding differently, so some activations round
  to the neighbouring int8 step and the logits move by about 3e-3 of the largest, 30 times the float formats'
  tolerance. The float run the quantized one came from exports to every format.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from resnet_jax.deploy.formats import ExportError
from resnet_jax.deploy.servable import Servable, fold_for_serving
from resnet_jax.models import create_model

# The formats a quantized run exports to, and whether each carries the run's int8 convs or quantizes anew.
QUANTIZED_FORMATS = {"stablehlo": "carried", "savedmodel": "carried", "tflite_int8": "requantized"}


def check_quantized_format(config: ml_collections.ConfigDict, fmt: str, workdir: Any, meta: dict[str, Any]) -> None:
    """Refuse, in one line and before anything loads, a format that cannot export the run of ``config``."""
    settings = config.get("quantize")
    if settings is None:
        return
    if settings.arithmetic == "fake":
        raise ExportError(
            f"{workdir} is the quantization-aware fine-tuning inside a quantized run (its convs round in float): "
            "export the quantized run in its parent folder, or the float run it started from."
        )
    if fmt not in QUANTIZED_FORMATS:
        origin = meta.get("quantized_from", "the float run it was quantized from")
        raise ExportError(
            f"{workdir} is an int8-quantized run, which exports to {', '.join(QUANTIZED_FORMATS)} only ({fmt} cannot "
            f"run its int8 convs exactly); for {fmt}, export the float run it came from ({origin})."
        )


def dequantized_params(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with every int8 conv as a float32 kernel alone: each value times its channel's ``kernel_scale``
    (exactly a multiple of it); the input scales are dropped."""
    flat = traverse_util.flatten_dict(jax.device_get(params))
    out = {}
    for path, value in flat.items():
        layer, leaf = path[:-1], path[-1]
        if leaf in ("kernel_scale", "input_scale") and (*layer, "kernel") in flat:
            continue
        if leaf == "kernel" and np.asarray(value).dtype == np.int8:
            value = np.asarray(value, np.float32) * np.asarray(flat[(*layer, "kernel_scale")], np.float32)
        out[path] = value
    return traverse_util.unflatten_dict(out)


def serving_form(
    servable: Servable, config: ml_collections.ConfigDict, fmt: str, meta: dict[str, Any], representative: int
) -> tuple[Servable, dict[str, Any]]:
    """What goes out for ``servable``, a run of ``config`` (checkpoint ``meta``) built with its own conv, in
    ``fmt``, and the JSON entries to add: a float run batch norm folded, nothing to add (the JSON says it is folded);
    a quantized run as the module's docstring says (``representative``: the TFLite converter's calibration images)."""
    settings = config.get("quantize")
    if settings is None:
        return fold_for_serving(servable), {}
    run = {"quantized_from": meta.get("quantized_from")}
    run |= {key: settings.get(key) for key in ("calibration", "calibration_images", "percentile", "arithmetic")}
    run["qat_steps"] = settings.get("qat_steps", 0)
    if QUANTIZED_FORMATS[fmt] == "carried":
        run["int8"] = "the run's int8 kernels and input scales; int8 x int8 convs summed in int32"
        batch_norm = "unfolded: an eval-mode batch norm after each int8 conv (folding would change its integers)"
        return servable, {"batch_norm": batch_norm, "quantized_run": run}
    plain = create_model(config.model, num_classes=servable.model.num_classes, **config.model_overrides)
    variables = {**servable.variables, "params": dequantized_params(servable.variables["params"])}
    run["int8"] = (
        "weights: the run's int8 kernels, dequantized and batch norm folded; the converter's per-channel int8 "
        "weights are the run's integers (negated where a batch norm scale is negative). Activations: recalibrated "
        f"by the TFLite converter on {representative} training images (per tensor, with a zero point), not the "
        "run's input scales. The dense head, float32 in the run, is int8 here."
    )
    folded = fold_for_serving(dataclasses.replace(servable, model=plain, variables=variables))
    return folded, {
        "batch_norm": "folded into the dequantized convs, then quantized by the converter",
        "quantized_run": run,
    }
