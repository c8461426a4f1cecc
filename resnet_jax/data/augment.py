"""Host-side augmentation in numpy, vectorised over the batch.

Every random choice is drawn from an explicit ``np.random.Generator`` and sampling is kept apart
from applying, so that the pipeline can draw the choices of a whole global batch from one seed and
apply them to the rows of one process only: a batch then depends on (seed, step) alone.
"""

from __future__ import annotations

import numpy as np

# Per-channel mean and standard deviation of the training images, in [0, 1].
CHANNEL_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def sample_crop_flip(rng: np.random.Generator, n: int, pad: int, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Draw the crop offsets (n, 2) in [0, 2 * pad] and the flip flags (n,) of ``n`` images."""
    offsets = rng.integers(0, 2 * pad + 1, size=(n, 2))
    flips = rng.random(n) < 0.5 if flip else np.zeros(n, dtype=bool)
    return offsets, flips


def apply_crop_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, pad: int) -> np.ndarray:
    """Zero-pad NHWC ``images`` by ``pad``, crop each back to H x W at its offset and mirror the flagged ones."""
    n, h, w, _ = images.shape
    if pad == 0 and not flips.any():
        return images
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = offsets[:, :1] + np.arange(h)
    cols = offsets[:, 1:] + np.where(flips[:, None], np.arange(w - 1, -1, -1), np.arange(w))
    # One flat gather of whole pixels: faster than indexing with three broadcast index arrays.
    pixel = (np.arange(n)[:, None, None] * (h + 2 * pad) + rows[:, :, None]) * (w + 2 * pad) + cols[:, None, :]
    return np.take(padded.reshape(-1, images.shape[-1]), pixel, axis=0)


def random_crop_flip(images: np.ndarray, rng: np.random.Generator, pad: int = 4, flip: bool = True) -> np.ndarray:
    """He et al. (2016) CIFAR augmentation: pad by ``pad`` zeros, random crop to the original size, random mirror."""
    offsets, flips = sample_crop_flip(rng, len(images), pad, flip)
    return apply_crop_flip(images, offsets, flips, pad)


def sample_erasing(
    rng: np.random.Generator,
    n: int,
    image_shape: tuple[int, int, int],
    probability: float,
    area: tuple[float, float] = (0.02, 0.4),
    min_aspect: float = 0.3,
    attempts: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw the random-erasing boxes (n, 4) = (top, left, height, width) and uint8 fill noise of ``n`` images.

    Zhong et al. (2020): with ``probability``, a box covering a uniform ``area`` fraction of the image with
    an aspect ratio uniform in [min_aspect, 1 / min_aspect], redrawn (up to ``attempts`` times) until it
    fits; a box of height 0 erases nothing. The fill is uniform noise in [0, 255], as in the paper.
    """
    height, width, channels = image_shape
    areas = rng.uniform(*area, size=(attempts, n)) * height * width
    aspects = rng.uniform(min_aspect, 1 / min_aspect, size=(attempts, n))
    box_h = np.rint(np.sqrt(areas * aspects)).astype(np.int64)
    box_w = np.rint(np.sqrt(areas / aspects)).astype(np.int64)
    fits = (box_h > 0) & (box_w > 0) & (box_h < height) & (box_w < width)
    first = fits.argmax(0)
    box_h, box_w = box_h[first, np.arange(n)], box_w[first, np.arange(n)]
    erased = fits.any(0) & (rng.random(n) < probability)
    box_h, box_w = np.where(erased, box_h, 0), np.where(erased, box_w, 0)
    top = rng.integers(0, height - box_h + 1)
    left = rng.integers(0, width - box_w + 1)
    noise = rng.integers(0, 256, size=(n, height, width, channels), dtype=np.uint8)
    return np.stack([top, left, box_h, box_w], axis=1), noise


def apply_erasing(images: np.ndarray, boxes: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """NHWC ``images`` with the pixels inside each image's box replaced by its ``noise`` (see `sample_erasing`)."""
    top, left, box_h, box_w = (boxes[:, i : i + 1] for i in range(4))
    rows = (np.arange(images.shape[1]) >= top) & (np.arange(images.shape[1]) < top + box_h)
    cols = (np.arange(images.shape[2]) >= left) & (np.arange(images.shape[2]) < left + box_w)
    inside = rows[:, :, None, None] & cols[:, None, :, None]
    return np.where(inside, noise, images)


def random_erasing(images: np.ndarray, rng: np.random.Generator, probability: float = 0.5) -> np.ndarray:
    """Zhong et al. (2020) random erasing of uint8 NHWC ``images`` (see `sample_erasing`)."""
    boxes, noise = sample_erasing(rng, len(images), images.shape[1:], probability)
    return apply_erasing(images, boxes, noise)


def normalize(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 images to float32 with zero mean and unit variance per channel (stats given in [0, 1])."""
    out = np.subtract(images, 255 * np.asarray(mean, np.float32), dtype=np.float32)
    out *= 1 / (255 * np.asarray(std, np.float32))
    return out


def one_hot(labels: np.ndarray, num_classes: int, smoothing: float = 0.0) -> np.ndarray:
    """float32 one-hot targets; ``smoothing`` spreads that much probability mass uniformly over all classes."""
    targets = np.eye(num_classes, dtype=np.float32)[labels]
    return targets * (1 - smoothing) + smoothing / num_classes if smoothing else targets


def sample_mixup(rng: np.random.Generator, n: int, alpha: float) -> tuple[float, np.ndarray]:
    """Draw the mixup weight lambda ~ Beta(alpha, alpha) of a batch and the partner of each of its ``n`` rows."""
    return float(rng.beta(alpha, alpha)), rng.permutation(n)


def mixup(
    images: np.ndarray, labels_onehot: np.ndarray, rng: np.random.Generator, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """Zhang et al. (2018): blend each (float) image and target with those of a random partner in the batch."""
    lam, partner = sample_mixup(rng, len(images), alpha)
    return lam * images + (1 - lam) * images[partner], lam * labels_onehot + (1 - lam) * labels_onehot[partner]


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """float NHWC ``images`` resized to size x size: bilinear, antialiased when shrinking.

    The same weights as ``jax.image.resize(..., "linear", antialias=True)``, applied on the host as two small
    matrix products, so that the input pipeline stays in numpy (e.g. 28x28 Fashion-MNIST to the 64x64 or larger
    inputs that ImageNet weights expect).
    """
    if size < 1:
        raise ValueError(f"image_size={size}: give a positive number of pixels, e.g. 64.")
    rows, cols = _resize_weights(images.shape[1], size), _resize_weights(images.shape[2], size)
    out = np.einsum("oh,nhwc->nowc", rows, images, optimize=True)
    return np.einsum("pw,nowc->nopc", cols, out, optimize=True).astype(np.float32)


def _resize_weights(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) interpolation weights: a triangle kernel, widened by the shrink factor."""
    scale = size_out / size_in
    width = max(1 / scale, 1.0)
    centres = (np.arange(size_out) + 0.5) / scale - 0.5
    weights = np.maximum(0.0, 1 - np.abs(centres[:, None] - np.arange(size_in)) / width)
    return (weights / weights.sum(1, keepdims=True)).astype(np.float32)
