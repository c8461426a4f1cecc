"""Export: a model in one deployment format, checked in that format's runtime, with a JSON file beside it that
says what it takes and gives and how closely it follows the JAX model.

`export_servable` exports any model and variables (a `Servable`); `export_checkpoint` exports a run's
checkpoint, its batch norm folded, checked on the run's own test images against the model the run computes with:
built with the run's own conv (a low-rank run's factorised convs, a quantized run's int8 ones; see
`resnet_jax.deploy.quantized` for what each format makes of those).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from resnet_jax import data
from resnet_jax.compress.layers import compressed_conv
from resnet_jax.deploy.formats import (
    FLOAT_FORMATS,
    FORMATS,
    ONNX_OPSET,
    ExportError,
    check_installed,
    write_artifact,
)
from resnet_jax.deploy.quantized import check_quantized_format, serving_form
from resnet_jax.deploy.servable import Servable, class_list
from resnet_jax.deploy.verify import agreement, check_agreement, run_in_fresh_process
from resnet_jax.models import create_model
from resnet_jax.models.blocks import Conv
from resnet_jax.train.runs import load_run, run_config

# The packages whose versions an artifact's JSON records, by format.
RUNTIME_PACKAGES = {
    "stablehlo": ("jax", "jaxlib"),
    "savedmodel": ("jax", "tensorflow-cpu", "tensorflow"),
    "tflite": ("jax", "tensorflow-cpu", "tensorflow", "ai-edge-litert"),
    "tflite_int8": ("jax", "tensorflow-cpu", "tensorflow", "ai-edge-litert"),
    "onnx": ("jax", "jax2onnx", "onnx", "onnxruntime"),
}


@dataclasses.dataclass(frozen=True)
class CheckImages:
    """Images to check an export on (as the servable takes them), their labels if known, and calibration images
    for int8 quantization (from the training data, as the servable takes them)."""

    images: np.ndarray
    labels: np.ndarray | None
    representative: np.ndarray


def export_servable(
    servable: Servable,
    fmt: str,
    out: str | Path,
    check: CheckImages,
    *,
    reference: Servable | None = None,
    force: bool = False,
    notes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``servable`` in format ``fmt`` to ``out``, run it in its runtime on ``check.images``, and write
    ``out``.json; returns that JSON's contents. Raises `ExportError` if the artifact does not compute the logits of
    ``reference`` (default: ``servable`` itself; e.g. the model before its batch norm was folded). ``notes`` join
    the JSON (and replace its entries of the same name), e.g. how a quantized run's weights went out."""
    out = Path(out)
    check_destination(fmt, out, force)
    expected = np.asarray(jax.jit((reference or servable).function())(check.images))
    remove_artifact(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_artifact(servable, fmt, out, check.representative)
    # The check images, and one image alone: a symbolic batch dimension must take any size.
    logits, single = run_in_fresh_process(fmt, out, check.images, check.images[:1])
    measured = agreement(logits, expected, check.labels)
    check_agreement(fmt, measured)
    if fmt in FLOAT_FORMATS:
        check_agreement(fmt, agreement(single, expected[:1]))
    meta = {
        **servable.describe(),
        "format": fmt,
        **({"onnx_opset": ONNX_OPSET} if fmt == "onnx" else {}),
        "batch_norm": "folded into the convs" if "batch_stats" not in servable.variables else "batch_stats",
        "size_bytes": artifact_size(out),
        "versions": package_versions(fmt),
        "agreement_with_jax": measured,
        **(notes or {}),
    }
    metadata_path(out).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def check_destination(fmt: str, out: Path, force: bool) -> None:
    """A known format, and an output path that is free (or ``force``)."""
    if fmt not in FORMATS:
        raise ValueError(f"Unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    if (out.exists() or metadata_path(out).exists()) and not force:
        raise ValueError(f"{out} exists; choose another --out, or add --force to replace it.")
    check_installed(fmt)


def export_checkpoint(
    workdir: str | Path,
    fmt: str,
    out: str | Path,
    *,
    step: int | None = None,
    force: bool = False,
    raw_input: bool = False,
    num_check_images: int = 256,
) -> dict[str, Any]:
    """Export the checkpoint at ``step`` (default: the latest) of a run, batch norm folded, checked against the
    unfolded model on the first ``num_check_images`` test images of its data set. ``raw_input`` puts the
    preprocessing in the artifact. A quantized run goes out as `resnet_jax.deploy.quantized` says, and a format
    that cannot carry it is refused before anything loads."""
    check_destination(fmt, Path(out), force)
    saved_config, meta = run_config(workdir, step)
    check_quantized_format(saved_config, fmt, workdir, meta)
    model, state, config = load_run(workdir, step)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    if not all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(jax.device_get(variables))):
        raise ValueError(
            f"The checkpoint in {workdir} holds NaN or infinite weights (its run diverged): export an earlier --step."
        )
    test = data.load_run_source(config, config.eval_split)
    train = data.load_run_source(config, "train")
    size = config.get("image_size")
    stored = tuple(test.image_shape)
    servable = Servable(
        model=create_model(
            config.model, num_classes=model.num_classes, conv=compressed_conv(config, Conv), **config.model_overrides
        ),
        variables=variables,
        name=config.model,
        input_shape=(size, size, stored[2]) if size else stored,
        mean=tuple(test.mean),
        std=tuple(test.std),
        class_names=class_list(test.class_names, model.num_classes),
        raw_input=raw_input,
        stored_shape=stored,
    )
    check = CheckImages(
        images=servable_images(servable, test.images[:num_check_images]),
        labels=np.asarray(test.labels[:num_check_images]),
        representative=servable_images(servable, train.images[:200]),
    )
    serving, notes = serving_form(servable, config, fmt, meta, len(check.representative))
    return export_servable(serving, fmt, out, check, reference=servable, force=force, notes=notes)


def servable_images(servable: Servable, stored: np.ndarray) -> np.ndarray:
    """uint8 images as stored, in the form ``servable`` takes (as they are, or preprocessed)."""
    if servable.raw_input:
        return np.asarray(stored, np.uint8)
    return np.asarray(jax.jit(servable.preprocess)(stored), np.float32)


def metadata_path(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + ".json")


def external_data(path: Path) -> Path:
    """Where an ONNX file keeps its weights when they do not fit in it (jax2onnx writes large models' weights
    beside the graph, e.g. resnet50's): the artifact is both files."""
    return path.with_name(path.name + ".data")


def artifact_size(path: Path) -> int:
    """Bytes of a file (with its ONNX external data), or of every file under a folder (a SavedModel)."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    data = external_data(path)
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def package_versions(fmt: str) -> dict[str, str]:
    versions = {}
    for package in ("resnet-jax", *RUNTIME_PACKAGES[fmt]):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue  # e.g. tensorflow where tensorflow-cpu provides it
    return versions


def remove_artifact(path: Path) -> None:
    """Delete an artifact: a file with its ONNX external data, or a folder."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
        external_data(path).unlink(missing_ok=True)  # a stale one would be read by the new graph


__all__ = ["CheckImages", "ExportError", "export_checkpoint", "export_servable"]
