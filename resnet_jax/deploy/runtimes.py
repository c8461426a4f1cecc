"""Running an exported artifact in its own runtime, the way a user of the artifact would, with no JAX model at
hand: ``jax.export.deserialize`` (StableHLO), ``tf.saved_model.load``, the LiteRT interpreter, onnxruntime.

``python -m resnet_jax.deploy.runtimes FORMAT ARTIFACT IMAGES.npy LOGITS.npy [IMAGES.npy LOGITS.npy ...]`` runs one
in a fresh process on each file of images, which is how export checks what it wrote (`resnet_jax.deploy.verify`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from resnet_jax.extras import require


def run_stablehlo(path: Path, images: np.ndarray) -> np.ndarray:
    import jax

    exported = jax.export.deserialize(bytearray(path.read_bytes()))
    return np.asarray(exported.call(images))


def run_savedmodel(path: Path, images: np.ndarray) -> np.ndarray:
    tf = require("tensorflow", extra="export")
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    return serve(images=tf.constant(images))["logits"].numpy()


def run_tflite(path: Path, images: np.ndarray) -> np.ndarray:
    interpreter = tflite_interpreter(path, len(images))
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], images)
    interpreter.invoke()
    return np.array(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))


def tflite_interpreter(path: Path, batch_size: int) -> Any:
    """The LiteRT interpreter of a .tflite file, sized for batches of ``batch_size``, on every core this process
    may use (as XLA and ONNX Runtime are; LiteRT's own default may be fewer)."""
    litert = require("ai_edge_litert.interpreter")
    interpreter = litert.Interpreter(model_path=str(path), num_threads=len(os.sched_getaffinity(0)))
    details = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(details["index"], [batch_size, *details["shape"][1:]])
    interpreter.allocate_tensors()
    return interpreter


def run_onnx(path: Path, images: np.ndarray) -> np.ndarray:
    onnxruntime = require("onnxruntime")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


RUNNERS: dict[str, Callable[[Path, np.ndarray], np.ndarray]] = {
    "stablehlo": run_stablehlo,
    "savedmodel": run_savedmodel,
    "tflite": run_tflite,
    "tflite_int8": run_tflite,
    "onnx": run_onnx,
}


def run_artifact(fmt: str, path: str | Path, images: np.ndarray) -> np.ndarray:
    """The logits of ``images`` under the artifact at ``path``, in format ``fmt``'s runtime."""
    return RUNNERS[fmt](Path(path), images)


def main(argv: list[str]) -> None:
    fmt, artifact, *files = argv
    for images, logits in zip(files[::2], files[1::2], strict=True):
        np.save(logits, run_artifact(fmt, artifact, np.load(images)))


if __name__ == "__main__":
    main(sys.argv[1:])
