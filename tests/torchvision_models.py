"""torchvision's ResNets with random weights whose BatchNorm layers matter, for the weight-conversion tests.

No weights can be downloaded here, so the tests build ``torchvision.models.NAME(weights=None)`` and make its eval
mode a real test: BN scales U(0.5, 1.5) and offsets N(0, 0.2^2) instead of 1 and 0, and running statistics near,
but not equal to, the batch statistics of the test input (mean + N(0, 0.5^2) * std, variance * U(0.5, 2)). Far
from those, the un-normalised activations grow with depth until a wrong BN entry deep in the net no longer shows
in the logits (see tests/test_torch_equivalence.py).

Import torchvision from here (or through `import_torchvision`): PyPI's torchvision wheel is built for CUDA torch,
and beside the CPU torch it fails on import unless two of its op schemas are declared first.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from resnet_jax.bench.jpeg_inputs import import_torchvision

torchvision = import_torchvision()
from torchvision import transforms  # noqa: E402

__all__ = ["random_torchvision", "relative_error", "sample_images", "to_nchw", "torchvision", "transforms"]

SIZE, BATCH = 64, 2


def sample_images(seed: int = 1) -> np.ndarray:
    """NHWC float32 images of the conversion tests."""
    return np.random.default_rng(seed).normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32)


def to_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """max|actual - reference| / max|reference| (the metric of tests/test_torch_equivalence.py)."""
    actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    assert actual.shape == reference.shape, (actual.shape, reference.shape)
    return float(np.max(np.abs(actual - reference)) / np.max(np.abs(reference)))


@functools.cache
def random_torchvision(name: str, num_classes: int = 1000, seed: int = 0) -> torch.nn.Module:
    """``torchvision.models.<name>`` in eval mode, seeded, with the BN layers described above (built once: treat it
    as read-only)."""
    torch.manual_seed(seed)
    module = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    layers = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for bn in layers:
            bn.weight.copy_(torch.empty_like(bn.weight).uniform_(0.5, 1.5, generator=generator))
            bn.bias.copy_(torch.empty_like(bn.bias).normal_(0.0, 0.2, generator=generator))
            bn.momentum = 1.0  # one train-mode pass sets the running statistics to the batch's
        module.train()(to_nchw(sample_images()))
        for bn in layers:
            std = bn.running_var.sqrt()
            bn.running_mean += 0.5 * std * torch.empty_like(std).normal_(generator=generator)
            bn.running_var *= torch.empty_like(std).uniform_(0.5, 2.0, generator=generator)
            bn.momentum = 0.1
            bn.num_batches_tracked.zero_()  # a fresh model's counter: Flax has none to carry
    return module.eval()
