"""int8 TFLite files exported from a float run and from its quantized runs, compared: their weights (the int8 values
of every per-channel quantized tensor: the convs' and the dense head's) and their logits on the float run's whole
test set.

Run from the repository root after exporting each run with ``resnet-jax export --format tflite_int8``
(benchmarks/compression.md has the commands and the results):

    python benchmarks/quantized_tflite.py runs/fm fm_int8.tflite fm_int8_percentile.tflite fm_int8_minmax.tflite

The first file is the reference (the float run's export); each other is compared with it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from resnet_jax import data
from resnet_jax.deploy.runtimes import run_tflite
from resnet_jax.extras import require
from resnet_jax.train.runs import load_run


def int8_weights(path: Path) -> dict[str, np.ndarray]:
    """The int8 weights of a .tflite file (per-channel quantized; activations have one scale each), by name."""
    interpreter = require("ai_edge_litert.interpreter").Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    return {
        d["name"]: np.array(interpreter.get_tensor(d["index"]))
        for d in interpreter.get_tensor_details()
        if d["dtype"] == np.int8 and len(d["quantization_parameters"]["scales"]) > 1
    }


def batched_logits(path: Path, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    return np.concatenate([run_tflite(path, images[i : i + batch]) for i in range(0, len(images), batch)])


def main(run: str, reference: str, *others: str) -> None:
    config = load_run(run)[2]
    test = data.load_source(config.dataset, config.eval_split, config.data_dir, config.get("download", True))
    mean, std = 255 * np.asarray(test.mean, np.float32), 255 * np.asarray(test.std, np.float32)
    images = ((np.asarray(test.images, np.float32) - mean) / std).astype(np.float32)
    labels = np.asarray(test.labels)
    weights = int8_weights(Path(reference))
    expected = batched_logits(Path(reference), images)
    print(f"{reference}: accuracy {np.mean(expected.argmax(-1) == labels):.4f} on {len(labels)} test images")
    for other in others:
        theirs = int8_weights(Path(other))
        differing = sum(int(np.sum(theirs[name] != kernel)) for name, kernel in weights.items())
        total = sum(kernel.size for kernel in weights.values())
        logits = batched_logits(Path(other), images)
        print(
            f"{other}: accuracy {np.mean(logits.argmax(-1) == labels):.4f}; int8 weights differing from the "
            f"reference's: {differing} of {total} int8 values; same top-1 class on "
            f"{np.mean(logits.argmax(-1) == expected.argmax(-1)):.4f} of the images; same file: "
            f"{Path(other).read_bytes() == Path(reference).read_bytes()}"
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
