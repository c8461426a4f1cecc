"""How closely int8 TFLite follows the JAX model: resnet50 at 224x224 with random weights, on random images.

Run from the repository root (benchmarks/inference.md has the results):

    PYTHONPATH=tests python benchmarks/int8_agreement.py init       # the initialised weights, BN at identity
    PYTHONPATH=tests python benchmarks/int8_agreement.py perturbed  # BN with random statistics, as training leaves

Random images through random weights tend to give every image the same top-1 class, which makes top-1 agreement say
little; the logits centred on each class's mean over the images (what depends on the image) say more.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
from test_deploy_fold import trained_variables

from resnet_jax import create_model
from resnet_jax.deploy.formats import write_artifact
from resnet_jax.deploy.servable import Servable, fold_for_serving
from resnet_jax.deploy.verify import agreement, run_in_fresh_process

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's
SHAPE = (224, 224, 3)


def random_images(rng: np.random.Generator, count: int) -> np.ndarray:
    """Uniform random bytes, normalised as ImageNet images are."""
    pixels = rng.integers(0, 256, (count, *SHAPE)).astype(np.float32) / 255
    return ((pixels - np.asarray(MEAN)) / np.asarray(STD)).astype(np.float32)


def main(variant: str, count: int = 64) -> None:
    """Export resnet50 (``variant``: init or perturbed weights) to int8 TFLite and print its agreement with JAX."""
    model = create_model("resnet50")
    zeros = np.zeros((1, *SHAPE), np.float32)
    variables = model.init(jax.random.key(0), zeros, train=False)
    if variant == "perturbed":
        variables = trained_variables(model, zeros)
    servable = Servable(model, variables, "resnet50", SHAPE, MEAN, STD, tuple(map(str, range(1000))))
    rng = np.random.default_rng(0)
    check, representative = random_images(rng, count), random_images(rng, count)
    expected = np.asarray(jax.jit(servable.function())(check))
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "resnet50_int8.tflite"
        write_artifact(fold_for_serving(servable), "tflite_int8", out, representative)
        (logits,) = run_in_fresh_process("tflite_int8", out, check)
        size = out.stat().st_size
    top5 = np.argsort(-expected, axis=-1)[:, :5]
    print(f"{variant}: {size / 1e6:.1f} MB, {len(set(expected.argmax(-1)))} distinct JAX top-1 classes")
    print("  logits:", agreement(logits, expected))
    print("  int8 top-1 in JAX top-5:", float(np.mean([a in b for a, b in zip(logits.argmax(-1), top5, strict=True)])))
    print("  centred logits:", agreement(logits - logits.mean(0), expected - expected.mean(0)))


if __name__ == "__main__":
    main(sys.argv[1])
