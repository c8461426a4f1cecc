"""The optional parts of the install: each heavy dependency is imported through `require`, where it is needed.

The core install (IDX and synthetic data, training, analysis, JAX checkpoints) needs neither TensorFlow nor
PyTorch. The tfds data sets need the ``[tfds]`` extra, PyTorch weight files and the PyTorch benchmarks the
``[torch]`` extra, Keras weight files the ``[keras]`` extra; without it, `require` says in one line which
``pip install`` to run.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# The top-level module, the extra that installs it, and what needs it.
EXTRAS = {
    "tensorflow": ("tfds", "the tfds data sets (CIFAR-10, CIFAR-100, ImageNet)"),
    "tensorflow_datasets": ("tfds", "the tfds data sets (CIFAR-10, CIFAR-100, ImageNet)"),
    "torch": ("torch", "PyTorch weight files (resnet-jax convert) and the PyTorch rows of resnet-jax bench"),
    "safetensors": ("torch", "PyTorch weight files (resnet-jax convert)"),
    "jax2onnx": ("export", "ONNX export (resnet-jax export --format onnx)"),
    "onnxruntime": ("export", "ONNX models (resnet-jax export --format onnx, resnet-jax bench --inference)"),
    "ai_edge_litert": ("export", "TFLite models (resnet-jax export --format tflite, resnet-jax bench --inference)"),
    "keras": ("keras", "Keras weight files (resnet-jax convert --from-keras)"),
    "h5py": ("keras", "Keras weight files (resnet-jax convert --from-keras)"),
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


# Extras that share a module with another: what they need it for, where `require` is told which one asks.
SHARED = {"export": "TF SavedModel and TFLite export (resnet-jax export)"}


def require(module: str, extra: str | None = None) -> ModuleType:
    """``import module``, or a `MissingExtraError` naming the ``pip install 'resnet-jax[EXTRA]'`` that provides it.

    ``extra`` names the extra that asks, where it is not the module's own (TensorFlow for ``export``)."""
    top = module.partition(".")[0]
    if top not in EXTRAS:
        raise ValueError(f"{module!r} is not an optional dependency; the optional ones are {', '.join(EXTRAS)}.")
    try:
        importlib.import_module(top)  # first: a submodule imported earlier would hide a package that is gone
        return importlib.import_module(module)
    except ImportError as error:
        if error.name is None or error.name.partition(".")[0] != top:
            raise  # the package is there but broken (a dependency of its own is missing): its own error says more
        extra, purpose = (extra, SHARED[extra]) if extra else EXTRAS[top]
        raise MissingExtraError(
            f"{top} is not installed, and {purpose} need it: pip install 'resnet-jax[{extra}]'", name=top
        ) from None
