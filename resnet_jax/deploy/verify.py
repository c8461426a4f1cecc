"""Checking an artifact against the JAX model: its logits, computed in its own runtime in a fresh process, on
the same images.

float32 formats must give the JAX logits within `FLOAT_TOLERANCE` (relative to the largest logit) and the same
top-1 class on every image. An int8 model cannot match logits that closely; it must keep the top-1 accuracy on
the labelled check images within `INT8_MAX_ACCURACY_LOSS` of the JAX model's (without labels, agree on the top-1
class of `INT8_MIN_AGREEMENT` of the images).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from resnet_jax.deploy.formats import FLOAT_FORMATS, ExportError

FLOAT_TOLERANCE = 1e-4
INT8_MAX_ACCURACY_LOSS = 0.02
INT8_MIN_AGREEMENT = 0.9


def run_in_fresh_process(fmt: str, path: Path, *batches: np.ndarray) -> list[np.ndarray]:
    """The artifact's logits of each batch of images, computed by `resnet_jax.deploy.runtimes` in one new Python
    process."""
    with tempfile.TemporaryDirectory(prefix="resnet-jax-verify-") as folder:
        files = [(Path(folder) / f"images{i}.npy", Path(folder) / f"logits{i}.npy") for i in range(len(batches))]
        for (inputs, _), images in zip(files, batches, strict=True):
            np.save(inputs, images)
        command = [sys.executable, "-m", "resnet_jax.deploy.runtimes", fmt, str(path)]
        done = subprocess.run([*command, *(str(f) for pair in files for f in pair)], capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            if done.returncode < 0:  # killed by a signal: the runtime itself crashed
                last = f"the runtime crashed (signal {-done.returncode}) after {last!r}"
            raise ExportError(f"The {fmt} artifact {path} does not run in its runtime: {last}")
        return [np.load(outputs) for _, outputs in files]


def agreement(logits: np.ndarray, expected: np.ndarray, labels: np.ndarray | None = None) -> dict[str, Any]:
    """How closely ``logits`` follow the JAX model's ``expected`` ones (and, given ``labels``, both accuracies)."""
    scale = float(np.max(np.abs(expected))) or 1.0
    result: dict[str, Any] = {
        "images": len(expected),
        "max_relative_error": float(np.max(np.abs(logits - expected)) / scale),
        "top1_agreement": float(np.mean(logits.argmax(-1) == expected.argmax(-1))),
    }
    if labels is not None:
        result["accuracy"] = float(np.mean(logits.argmax(-1) == labels))
        result["jax_accuracy"] = float(np.mean(expected.argmax(-1) == labels))
    return result


def check_agreement(fmt: str, measured: dict[str, Any]) -> None:
    """Raise `ExportError` where the artifact does not compute the model (see the module's docstring)."""
    if fmt in FLOAT_FORMATS:
        if measured["max_relative_error"] > FLOAT_TOLERANCE or measured["top1_agreement"] < 1:
            raise ExportError(
                f"The {fmt} artifact's logits differ from the JAX model's: max relative error "
                f"{measured['max_relative_error']:.2e} (tolerance {FLOAT_TOLERANCE:.0e}), top-1 agreement "
                f"{measured['top1_agreement']:.4f} on {measured['images']} images."
            )
        return
    if "accuracy" in measured:
        loss = measured["jax_accuracy"] - measured["accuracy"]
        if loss > INT8_MAX_ACCURACY_LOSS:
            raise ExportError(
                f"int8 quantization costs {loss:.2%} top-1 accuracy on {measured['images']} test images (at most "
                f"{INT8_MAX_ACCURACY_LOSS:.0%} accepted): export tflite (float32) instead."
            )
    elif measured["top1_agreement"] < INT8_MIN_AGREEMENT:
        raise ExportError(
            f"The int8 model agrees with the JAX model on the top-1 class of {measured['top1_agreement']:.2%} of "
            f"{measured['images']} images (at least {INT8_MIN_AGREEMENT:.0%} needed): export tflite instead."
        )
