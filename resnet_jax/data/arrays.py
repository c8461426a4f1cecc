"""A data set split held in memory (IDX files, tfds arrays, synthetic data) and the batches it makes on the host.

Training batches come from the index-based draws of `pipeline.BatchDrawer`: a pure function of (seed, step),
augmented in numpy and made ahead in a background thread. TensorFlow is never imported here.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Iterator

import numpy as np

from resnet_jax.data.augment import (
    apply_crop_flip,
    apply_erasing,
    normalize,
    one_hot,
    resize,
    sample_erasing,
    sample_mixup,
)
from resnet_jax.data.pipeline import Batch, BatchDrawer, BatchSettings, local_batch_size, prefetch

BATCHES_AHEAD = 2  # batches made in advance, while the train step runs


@dataclasses.dataclass(frozen=True, eq=False)
class ArraySource:
    """A whole split in memory: uint8 NHWC images and int32 labels, with what the pipeline needs to normalise."""

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()

    in_memory = True

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 NHWC; got {self.images.dtype} of shape {self.images.shape}.")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"labels must have shape ({len(self.images)},); got {self.labels.shape}.")

    @property
    def num_examples(self) -> int:
        return len(self.images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def check_settings(self, settings: BatchSettings) -> None:
        """Every `BatchSettings` suits an in-memory split that holds one global training batch."""

    def train_batches(self, settings: BatchSettings, start_step: int = 0) -> Iterator[Batch]:
        """Endless training batches from ``start_step`` on (see `Source.train_batches`): crop and flip, then random
        erasing (uint8, noise-filled boxes), normalisation, the resize to ``image_size`` and mixup, in that order."""
        draw = BatchDrawer(self.num_examples, settings)
        first = settings.process_index * settings.local_batch_size
        rows = slice(first, first + settings.local_batch_size)
        make = functools.partial(self._train_batch, draw, rows=rows, settings=settings)
        return prefetch(make, itertools.count(start_step), BATCHES_AHEAD)

    def _train_batch(self, draw: BatchDrawer, step: int, rows: slice, settings: BatchSettings) -> Batch:
        """This process's ``rows`` of global batch ``step``."""
        (index, offsets, flips), rng = draw(step)
        erase = settings.augment and settings.random_erasing > 0
        if erase:
            boxes, noise = sample_erasing(rng, settings.batch_size, self.image_shape, settings.random_erasing)

        def view(r: slice | np.ndarray) -> np.ndarray:
            images = apply_crop_flip(self.images[index[r]], offsets[r], flips[r], settings.applied_padding)
            if erase:
                images = apply_erasing(images, boxes[r], noise[r])
            return _resized(normalize(images, self.mean, self.std), settings.image_size)

        if not settings.mixup_alpha:
            return {"image": view(rows), "label": self.labels[index[rows]]}
        lam, partner = sample_mixup(rng, settings.batch_size, settings.mixup_alpha)
        targets = one_hot(self.labels[index], self.num_classes)
        mine, theirs = np.arange(settings.batch_size)[rows], partner[rows]
        return {
            "image": lam * view(mine) + (1 - lam) * view(theirs),
            "label": lam * targets[mine] + (1 - lam) * targets[theirs],
        }

    def eval_batches(self, settings: BatchSettings) -> Iterator[Batch]:
        """Every example once, in order, in global batches of ``eval_batch_size`` split over the processes, the
        last one padded with zeros (see `Source.eval_batches`); resized to ``image_size`` as in training."""
        batch_size = settings.eval_batch_size
        local = local_batch_size(batch_size, settings.process_count)
        num_batches = -(-self.num_examples // batch_size)
        height, width, channels = self.image_shape
        size = settings.image_size

        def make(b: int) -> Batch:
            start = b * batch_size + settings.process_index * local
            index = np.arange(start, start + local)
            real = index[index < self.num_examples]
            image = np.zeros((local, size or height, size or width, channels), np.float32)
            image[: len(real)] = _resized(normalize(self.images[real], self.mean, self.std), size)
            label = np.zeros(local, np.int32)
            label[: len(real)] = self.labels[real]
            return {"image": image, "label": label, "mask": (index < self.num_examples).astype(np.float32)}

        return prefetch(make, range(num_batches), BATCHES_AHEAD)


def _resized(images: np.ndarray, image_size: int | None) -> np.ndarray:
    return images if image_size is None else resize(images, image_size)
