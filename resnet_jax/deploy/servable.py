"""What an exported artifact computes: a model and its variables as one function from images to logits, with
the facts its users need (input shape and normalisation, class names).

Every format exports a `Servable`, so that any model a caller has (a folded checkpoint, a quantized one) goes out
the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.models import ResNet


@dataclasses.dataclass(frozen=True)
class Servable:
    """``model`` applied in eval mode with ``variables`` to NHWC images.

    With ``raw_input`` the function takes uint8 images as the data set stores them (``stored_shape``) and does
    the preprocessing itself: the resize to the model's input (bilinear, antialiased, as training resized) and
    the normalisation by ``mean`` and ``std`` (given in [0, 1]). Without it, it takes float32 images already
    preprocessed, of shape ``input_shape``.
    """

    model: ResNet
    variables: dict[str, Any]
    name: str
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    raw_input: bool = False
    stored_shape: tuple[int, int, int] | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The shape of one image the function takes."""
        return tuple(self.stored_shape or self.input_shape) if self.raw_input else tuple(self.input_shape)

    @property
    def image_dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.raw_input else np.float32)

    def function(self) -> Callable[[jax.Array], jax.Array]:
        """images (batch, *image_shape) -> float32 logits (batch, classes)."""

        def logits(images: jax.Array) -> jax.Array:
            if self.raw_input:
                images = self.preprocess(images)
            return self.model.apply(self.variables, images, train=False)[0]

        return logits

    def preprocess(self, images: jax.Array) -> jax.Array:
        """uint8 images as stored -> the float32 images the model takes."""
        mean = 255 * jnp.asarray(self.mean, jnp.float32)
        std = 255 * jnp.asarray(self.std, jnp.float32)
        images = (images.astype(jnp.float32) - mean) / std
        height, width, channels = self.input_shape
        if images.shape[1:3] != (height, width):
            shape = (images.shape[0], height, width, channels)
            images = jax.image.resize(images, shape, "linear", antialias=True)
        return images

    def describe(self) -> dict[str, Any]:
        """The input contract, for the JSON beside an artifact."""
        normalisation = {"mean": list(self.mean), "std": list(self.std), "scale": "pixels / 255"}
        return {
            "model": self.name,
            "input": {
                "layout": "NHWC",
                "shape": [None, *self.image_shape],
                "dtype": self.image_dtype.name,
                "preprocessing": "included: feed uint8 images as stored" if self.raw_input else "none",
                "normalisation": normalisation,
                "model_input_shape": list(self.input_shape),
            },
            "output": {"logits": [None, len(self.class_names)]},
            "class_names": list(self.class_names),
        }


def fold_for_serving(servable: Servable) -> Servable:
    """The same servable with batch norm folded into its convs (see `resnet_jax.deploy.fold`)."""
    from resnet_jax.deploy.fold import fold_batch_norm

    model, variables = fold_batch_norm(servable.model, servable.variables)
    return dataclasses.replace(servable, model=model, variables=variables)


def class_list(names: Sequence[str], num_classes: int) -> tuple[str, ...]:
    """``names`` when there is one per class, else the class numbers."""
    return tuple(names) if len(names) == num_classes else tuple(map(str, range(num_classes)))
