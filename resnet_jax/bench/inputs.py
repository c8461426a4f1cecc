"""Input-pipeline throughput: the host pipeline of training (`train_batches`) on Fashion-MNIST and on
CIFAR-shaped data, and a device-resident pipeline that keeps the whole uint8 data set on the accelerator
and gathers, crops, flips and normalises each batch there (no host-to-device copy per step)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnet_jax import data

CIFAR_SHAPE = (32, 32, 3)


@dataclasses.dataclass(frozen=True)
class InputRow:
    name: str
    img_per_s: float
    batch: int
    where: str  # "host" or "device"


class ResidentData:
    """A data set copied to the device once (uint8, zero-padded), and its augmented batches made there.

    Each epoch is a permutation of the examples (the last partial batch dropped), each image a random
    ``pad``-pixel crop of its zero-padded self, flipped with probability 1/2 if ``flip``, as in `train_batches`.
    `batch_at` is a pure function of its arrays, so a compiled loop of several steps can call it too.
    """

    def __init__(self, source: data.ArraySource, batch: int, seed: int = 0, pad: int = 4, flip: bool = True) -> None:
        self.images = jax.device_put(np.pad(source.images, ((0, 0), (pad, pad), (pad, pad), (0, 0))))
        self.labels = jax.device_put(source.labels)
        self.batch, self.pad, self.flip, self.image_shape = batch, pad, flip, source.image_shape
        self.steps_per_epoch = data.steps_per_epoch(source.num_examples, batch)
        self._mean = 255 * np.asarray(source.mean, np.float32)
        self._std = 255 * np.asarray(source.std, np.float32)
        self._order_key, self._augment_key = jax.random.split(jax.random.key(seed))
        self.make = jax.jit(self.batch_at)

    def order(self, epoch: int) -> jax.Array:
        """The permutation of the examples that epoch ``epoch`` takes."""
        return jax.random.permutation(jax.random.fold_in(self._order_key, epoch), len(self.labels))

    def batch_at(self, images: jax.Array, labels: jax.Array, order: jax.Array, step: jax.Array) -> dict[str, jax.Array]:
        """Batch ``step`` (counted from the first epoch) of the epoch whose permutation is ``order``."""
        batch, pad = self.batch, self.pad
        index = jax.lax.dynamic_slice_in_dim(order, (step % self.steps_per_epoch) * batch, batch)
        crop_key, flip_key = jax.random.split(jax.random.fold_in(self._augment_key, step))
        offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * pad + 1)

        def crop(i: jax.Array, offset: jax.Array) -> jax.Array:
            return jax.lax.dynamic_slice(images[i], (offset[0], offset[1], 0), self.image_shape)

        cropped = jax.vmap(crop)(index, offsets)
        if self.flip:
            flipped = jax.random.bernoulli(flip_key, 0.5, (batch,))
            cropped = jnp.where(flipped[:, None, None, None], cropped[:, :, ::-1], cropped)
        return {"image": (cropped.astype(jnp.float32) - self._mean) / self._std, "label": labels[index]}

    def __iter__(self) -> Iterator[dict[str, jax.Array]]:
        """Endless batches, one compiled call each."""
        for step in itertools.count():
            if step % self.steps_per_epoch == 0:
                order = self.order(step // self.steps_per_epoch)
            yield self.make(self.images, self.labels, order, jnp.int32(step))


def ready(batches: Iterator[dict[str, jax.Array]]) -> Iterator[dict[str, jax.Array]]:
    """Each batch waited for, so that timing counts the work and not only its dispatch."""
    for batch in batches:
        yield jax.block_until_ready(batch)


def input_rows(batch: int, num_batches: int, seed: int = 0) -> tuple[list[InputRow], list[str]]:
    """Images/s of each pipeline (pad-4 crop + flip, as the CIFAR recipes), and why any was skipped."""
    rows, skipped = [], []
    cifar = data.synthetic(num_examples=10 * batch, image_shape=CIFAR_SHAPE, seed=seed)
    sources = {"CIFAR-shaped 32x32x3 (synthetic)": cifar}
    try:
        sources = {"Fashion-MNIST 28x28x1": data.load_source("fashion_mnist", "train")} | sources
    except (FileNotFoundError, ValueError) as error:
        skipped.append(f"input Fashion-MNIST: no data here ({error})")
    for name, source in sources.items():
        batches = data.train_batches(source, global_batch_size=batch, seed=seed)
        rows.append(InputRow(name, data.measure_input_throughput(batches, num_batches), batch, "host"))
    device_batches = ready(iter(ResidentData(cifar, batch, seed)))
    rate = data.measure_input_throughput(device_batches, num_batches)
    rows.append(InputRow("CIFAR-shaped 32x32x3 (synthetic), device-resident", rate, batch, "device"))
    return rows, skipped


def config_input_row(
    config: ml_collections.ConfigDict, source: data.ArraySource | data.StreamSource, num_batches: int
) -> InputRow:
    """Images/s of an experiment's own training pipeline: its data, batch, image size and augmentation."""
    from resnet_jax.train.loop import training_batches

    rate = data.measure_input_throughput(training_batches(config, source), num_batches)
    return InputRow(f"{config.dataset} {config.train_split} (the config's pipeline)", rate, config.batch_size, "host")
