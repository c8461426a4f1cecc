"""Training batches made on the accelerator, from a data set copied there once.

A CIFAR-sized step on a GPU is shorter than the host takes to crop, flip, normalise and copy its batch, so
the host pipeline sets the pace. `DeviceImages` keeps the uint8 images on every device instead. The host
still draws each batch (`train_draws`: which examples, which crops and flips, a few KB per step), so the
batches are those of `ArraySource.train_batches`, bit for bit, and a run resumes at any step as before.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from resnet_jax.data.arrays import ArraySource
from resnet_jax.data.pipeline import BatchDraws


class DeviceImages:
    """An in-memory data set zero-padded by ``pad`` and placed with ``sharding`` (by default on the default
    device; replicated over a mesh for jit over many devices), and the pure function that makes a training
    batch from it: `batch` runs inside compiled steps, so several steps can run in one call."""

    def __init__(self, source: ArraySource, pad: int, sharding: jax.sharding.Sharding | None = None) -> None:
        padded = np.pad(source.images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        labels = source.labels.astype(np.int32)
        if sharding is None:
            self.images, self.labels = jax.device_put(padded), jax.device_put(labels)
        else:  # every process holds the whole data set: its local data is the global array
            self.images = jax.make_array_from_process_local_data(sharding, padded)
            self.labels = jax.make_array_from_process_local_data(sharding, labels)
        self.image_shape = source.image_shape
        # The host's `normalize`, in the same float32 arithmetic.
        self._mean = 255 * np.asarray(source.mean, np.float32)
        self._scale = 1 / (255 * np.asarray(source.std, np.float32))

    def batch(self, images: jax.Array, labels: jax.Array, draws: BatchDraws) -> dict[str, jax.Array]:
        """{"image", "label"} of the examples ``draws.index``: each image cropped at its offset from the padded
        copy, mirrored if flagged and normalised. ``images`` and ``labels`` are this object's arrays, passed in
        so that a compiled function takes them as arguments rather than baking them in as constants."""

        def crop(example: jax.Array, offset: jax.Array, flip: jax.Array) -> jax.Array:
            image = lax.dynamic_slice(images[example], (offset[0], offset[1], 0), self.image_shape)
            return jnp.where(flip, image[:, ::-1], image)

        cropped = jax.vmap(crop)(draws.index, draws.offsets, draws.flips)
        return {"image": (cropped.astype(jnp.float32) - self._mean) * self._scale, "label": labels[draws.index]}
