"""Writing a `Servable` in each export format. Every writer takes the servable, the path to write and
representative images (used by the int8 quantizer alone), and raises `ExportError` for a model the format
cannot represent.

- stablehlo: ``jax.export`` with a symbolic batch dimension, serialized (``jax.export.deserialize`` reads it);
- savedmodel: a TF SavedModel through ``jax2tf``, signature ``serving_default`` taking ``images``, giving ``logits``;
- tflite / tflite_int8: that SavedModel through the TFLite converter, in float32, or with every op in int8
  (weights and activations, calibrated on the representative images; float32 in and out);
- onnx: ``jax2onnx`` at opset `ONNX_OPSET`, with a symbolic batch dimension.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from resnet_jax.deploy.servable import Servable
from resnet_jax.extras import require

ONNX_OPSET = 21  # onnxruntime runs it on every provider; jax2onnx writes 21 and newer
INPUT_NAME, OUTPUT_NAME = "images", "logits"
REPRESENTATIVE_IMAGES = 200  # calibration images of the int8 quantizer


class ExportError(ValueError):
    """A model that a format cannot represent, or an artifact that does not compute the model's logits."""


def write_stablehlo(servable: Servable, path: Path, representative: np.ndarray) -> None:
    height, width, channels = servable.image_shape
    shape = jax.export.symbolic_shape(f"batch, {height}, {width}, {channels}")
    exported = jax.export.export(jax.jit(servable.function()))(jax.ShapeDtypeStruct(shape, servable.image_dtype))
    path.write_bytes(exported.serialize())


def write_savedmodel(servable: Servable, path: Path, representative: np.ndarray) -> None:
    tf = require("tensorflow", extra="export")
    from jax.experimental import jax2tf

    height, width, channels = servable.image_shape
    logits = jax2tf.convert(
        servable.function(), polymorphic_shapes=[f"(b, {height}, {width}, {channels})"], with_gradient=False
    )
    spec = tf.TensorSpec([None, *servable.image_shape], tf.as_dtype(servable.image_dtype), name=INPUT_NAME)
    module = tf.Module()
    module.serve = tf.function(lambda images: {OUTPUT_NAME: logits(images)}, input_signature=[spec], autograph=False)
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})


def write_tflite(servable: Servable, path: Path, representative: np.ndarray) -> None:
    path.write_bytes(_tflite_bytes(servable, representative, int8=False))


def write_tflite_int8(servable: Servable, path: Path, representative: np.ndarray) -> None:
    model = servable.model
    if model.stem == "imagenet" and model.stem_pool_pad_value == float("-inf"):
        # The quantizer keeps the -inf pad constant, and LiteRT then aborts the process on the model.
        raise ExportError(
            "int8 TFLite cannot represent the stem's max-pool padding of -inf (a PAD of -inf before MAX_POOL_2D, "
            "which a pre-activation ImageNet stem needs: no ReLU precedes its pool); export tflite (float32) instead."
        )
    path.write_bytes(_tflite_bytes(servable, representative, int8=True))


def _tflite_bytes(servable: Servable, representative: np.ndarray, int8: bool) -> bytes:
    tf = require("tensorflow", extra="export")
    folder = Path(tempfile.mkdtemp(prefix="resnet-jax-savedmodel-"))
    try:
        write_savedmodel(servable, folder / "model", representative)
        converter = tf.lite.TFLiteConverter.from_saved_model(str(folder / "model"))
        if int8:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.representative_dataset = lambda: ([image[None]] for image in representative)
        return converter.convert()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_onnx(servable: Servable, path: Path, representative: np.ndarray) -> None:
    jax2onnx = require("jax2onnx")
    spec = jax.ShapeDtypeStruct(("batch", *servable.image_shape), servable.image_dtype)
    jax2onnx.to_onnx(
        servable.function(),
        [spec],
        model_name=servable.name,
        opset=ONNX_OPSET,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        return_mode="file",
        output_path=str(path),
    )


WRITERS: dict[str, Callable[[Servable, Path, np.ndarray], None]] = {
    "stablehlo": write_stablehlo,
    "savedmodel": write_savedmodel,
    "tflite": write_tflite,
    "tflite_int8": write_tflite_int8,
    "onnx": write_onnx,
}
FORMATS = tuple(WRITERS)
FLOAT_FORMATS = ("stablehlo", "savedmodel", "tflite", "onnx")


# The optional modules that write each format and run it (`resnet_jax.deploy.runtimes`).
NEEDS = {
    "stablehlo": (),
    "savedmodel": ("tensorflow",),
    "tflite": ("tensorflow", "ai_edge_litert.interpreter"),
    "tflite_int8": ("tensorflow", "ai_edge_litert.interpreter"),
    "onnx": ("jax2onnx", "onnxruntime"),
}


def check_installed(fmt: str) -> None:
    """Fail with the `pip install` to run, before anything loads or compiles, if ``fmt`` needs a missing extra."""
    for module in NEEDS[fmt]:
        require(module, extra="export" if module == "tensorflow" else None)


def write_artifact(servable: Servable, fmt: str, path: Path, representative: np.ndarray) -> None:
    """Write ``servable`` in format ``fmt`` to ``path``; a converter's refusal becomes one `ExportError` line."""
    from resnet_jax.extras import MissingExtraError

    try:
        WRITERS[fmt](servable, path, representative)
    except MissingExtraError:
        raise
    except Exception as error:
        first_line = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise ExportError(f"{fmt} cannot represent {servable.name}: {first_line[:300]}") from error
